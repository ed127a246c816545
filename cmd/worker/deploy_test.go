package main

import (
	"encoding/json"
	"log/slog"
	"os"
	"regexp"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/virtbus/virtbus/internal/bus/bustest"
	"github.com/virtbus/virtbus/internal/vm"
)

// The supervisors' stop timeouts cover the longest command the worker
// accepts: SIGTERM lets running commands finish, and one may wait up to
// vm.MaxTimeout before the libvirt calls that end it.
func TestStopTimeoutsFitTheLongestCommand(t *testing.T) {
	t.Parallel()
	need := vm.MaxTimeout + 2*time.Minute
	files := []struct {
		path string
		re   *regexp.Regexp
	}{
		{"../../deploy/virtbus-worker.service", regexp.MustCompile(`(?m)^TimeoutStopSec=(\S+)$`)},
		{"../../docker-compose.yml", regexp.MustCompile(`(?m)^\s+stop_grace_period:\s*(\S+)$`)},
	}
	for _, f := range files {
		b, err := os.ReadFile(f.path)
		if err != nil {
			t.Fatal(err)
		}
		m := f.re.FindSubmatch(b)
		if m == nil {
			t.Errorf("%s: no stop timeout", f.path)
			continue
		}
		d, err := time.ParseDuration(systemdDuration(string(m[1])))
		if err != nil {
			t.Errorf("%s: stop timeout %q: %v", f.path, m[1], err)
			continue
		}
		if d < need {
			t.Errorf("%s: stop timeout %s, want at least %s (longest action timeout plus a margin)", f.path, d, need)
		}
	}
}

// systemdDuration turns systemd's "65min" into Go's "65m".
func systemdDuration(s string) string {
	return regexp.MustCompile(`min$`).ReplaceAllString(s, "m")
}

// unitFile is a systemd unit's settings: section, then key, then every
// value in order (a key may repeat).
type unitFile map[string]map[string][]string

// parseUnit reads the assignments of a unit file, ignoring comments.
func parseUnit(t *testing.T, path string) unitFile {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	u, section := unitFile{}, ""
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#") || strings.HasPrefix(line, ";"):
		case strings.HasPrefix(line, "[") && strings.HasSuffix(line, "]"):
			section = strings.Trim(line, "[]")
			u[section] = map[string][]string{}
		default:
			k, v, ok := strings.Cut(line, "=")
			if !ok || section == "" {
				t.Fatalf("%s: not an assignment in a section: %q", path, line)
			}
			u[section][k] = append(u[section][k], v)
		}
	}
	return u
}

// words is every space-separated item of key's values.
func (u unitFile) words(section, key string) []string {
	var out []string
	for _, v := range u[section][key] {
		out = append(out, strings.Fields(v)...)
	}
	return out
}

func (u unitFile) one(t *testing.T, section, key string) string {
	t.Helper()
	v := u[section][key]
	if len(v) != 1 {
		t.Fatalf("[%s] %s set %d times, want once: %q", section, key, len(v), v)
	}
	return v[0]
}

// The unit waits for the worker's READY=1, lets it (and only it) notify,
// and has a watchdog the worker's pings at half the interval can keep.
func TestUnitNotifyAndWatchdog(t *testing.T) {
	t.Parallel()
	u := parseUnit(t, "../../deploy/virtbus-worker.service")
	if got := u.one(t, "Service", "Type"); got != "notify" {
		t.Errorf("Type=%s, want notify", got)
	}
	if got := u.one(t, "Service", "NotifyAccess"); got != "main" {
		t.Errorf("NotifyAccess=%s, want main", got)
	}
	wd, err := time.ParseDuration(u.one(t, "Service", "WatchdogSec"))
	if err != nil {
		t.Fatalf("WatchdogSec: %v", err)
	}
	if wd < 10*time.Second || wd/2 < 4*notifyPoll {
		t.Errorf("WatchdogSec=%s: too short for a loaded hypervisor", wd)
	}
	stop, err := time.ParseDuration(systemdDuration(u.one(t, "Service", "TimeoutStopSec")))
	if err != nil || stop < vm.MaxTimeout {
		t.Errorf("TimeoutStopSec=%s (%v): the stop timeout must stay", stop, err)
	}
	if _, err := time.ParseDuration(systemdDuration(u.one(t, "Service", "TimeoutStartSec"))); err != nil {
		t.Errorf("TimeoutStartSec: %v", err)
	}
	after, wants := u.words("Unit", "After"), u.words("Unit", "Wants")
	for _, d := range []string{"libvirtd.service", "virtqemud.service"} {
		if !slices.Contains(after, d) {
			t.Errorf("After= does not name %s: %q", d, after)
		}
		// virtqemud.service conflicts with libvirtd.service: wanting both
		// would stop the daemon the host uses.
		if slices.Contains(wants, d) {
			t.Errorf("Wants= names %s: %q", d, wants)
		}
	}
}

// Each credential the unit loads (or offers, commented out) is the file a
// VIRTBUS_* variable names through %d, set in the unit, where systemd
// expands %d, and never in the environment file, where it does not.
func TestUnitCredentials(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("../../deploy/virtbus-worker.service")
	if err != nil {
		t.Fatal(err)
	}
	unit := string(b)
	creds := regexp.MustCompile(`(?m)^#?LoadCredential=([^:\s]+):/\S+$`).FindAllStringSubmatch(unit, -1)
	if len(creds) < 2 {
		t.Fatalf("unit offers %d credentials, want nats.creds and api-token", len(creds))
	}
	for _, c := range creds {
		env := regexp.MustCompile(`(?m)^#?Environment=VIRTBUS_[A-Z_]+=%d/` + regexp.QuoteMeta(c[1]) + `$`)
		if !env.MatchString(unit) {
			t.Errorf("credential %s: no Environment=VIRTBUS_…=%%d/%s names it", c[1], c[1])
		}
	}
	example, err := os.ReadFile("../../deploy/worker.env.example")
	if err != nil {
		t.Fatal(err)
	}
	if m := regexp.MustCompile(`(?m)^VIRTBUS_\S*%d.*$`).Find(example); m != nil {
		t.Errorf("worker.env.example sets %q: systemd does not expand %%d in an EnvironmentFile", m)
	}
}

// composeService is the block of one service in docker-compose.yml: its
// lines, indented under "  <name>:", up to the next service or top-level
// key. The test reads the file as text, like the ones above: no YAML parser
// is a dependency of the module.
func composeService(t *testing.T, name string) string {
	t.Helper()
	b, err := os.ReadFile("../../docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	var block []string
	in := false
	for line := range strings.Lines(string(b)) {
		switch {
		case line == "  "+name+":\n":
			in = true
		case in && regexp.MustCompile(`^ {0,2}\S`).MatchString(line):
			return strings.Join(block, "")
		case in:
			block = append(block, line)
		}
	}
	if !in {
		t.Fatalf("docker-compose.yml: no service %s", name)
	}
	return strings.Join(block, "")
}

// uncommented drops the comment lines of a YAML or Dockerfile block, so
// that what the tests find is what the file sets, not what it explains.
func uncommented(s string) string {
	return regexp.MustCompile(`(?m)^\s*#.*\n`).ReplaceAllString(s, "")
}

// The image's binary, from the Dockerfile's ENTRYPOINT.
func imageBinary(t *testing.T, dockerfile string) string {
	t.Helper()
	m := regexp.MustCompile(`(?m)^ENTRYPOINT \["([^"]+)"\]$`).FindStringSubmatch(dockerfile)
	if m == nil {
		t.Fatal("Dockerfile: no exec-form ENTRYPOINT")
	}
	return m[1]
}

// The image runs as a numeric non-root user, owns the state directory for
// it, and checks its health with the worker's own -healthcheck.
func TestDeployDockerfile(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	df := uncommented(string(b))
	bin := imageBinary(t, df)
	users := regexp.MustCompile(`(?m)^USER (\S+)$`).FindAllStringSubmatch(df, -1)
	if len(users) == 0 {
		t.Fatal("Dockerfile: no USER: the image would run as root")
	}
	if u := users[len(users)-1][1]; !regexp.MustCompile(`^[1-9][0-9]*:[1-9][0-9]*$`).MatchString(u) {
		t.Errorf("Dockerfile: USER %s, want a numeric non-root uid:gid", u)
	}
	if !regexp.MustCompile(`install -d -o virtbus -g virtbus [^\n]*/var/lib/virtbus`).MatchString(df) {
		t.Error("Dockerfile: the state directory is not made the virtbus user's")
	}
	want := `CMD ["` + bin + `", "-healthcheck"]`
	if !regexp.MustCompile(`(?m)^HEALTHCHECK [^\n]*\\\n\s*`+regexp.QuoteMeta(want)+`$`).MatchString(df) &&
		!regexp.MustCompile(`(?m)^HEALTHCHECK .*`+regexp.QuoteMeta(want)+`$`).MatchString(df) {
		t.Errorf("Dockerfile: no HEALTHCHECK %s", want)
	}
}

// The worker service runs unprivileged: not root, with the host's libvirt
// group passed in, no capabilities, a read-only root with the state
// directory a volume, no privilege gain; it reaches libvirt through the
// mounted /run/libvirt directory, and has the image's health check.
func TestDeployCompose(t *testing.T) {
	t.Parallel()
	w := uncommented(composeService(t, "worker"))
	df, err := os.ReadFile("../../Dockerfile")
	if err != nil {
		t.Fatal(err)
	}
	bin := imageBinary(t, string(df))
	for _, c := range []struct{ what, re string }{
		{"a non-root user", `\n    user: "?[1-9][0-9]*(:[1-9][0-9]*)?"?\n`},
		{"the host's libvirt gid as a supplementary group", `\n    group_add:\n      - "\$\{LIBVIRT_GID[:?}]`},
		{"cap_drop: [ALL]", `\n    cap_drop: \[ALL\]\n`},
		{"read_only: true", `\n    read_only: true\n`},
		{"no-new-privileges", `\n    security_opt:\n      - no-new-privileges:true\n`},
		{"the libvirt directory, bind-mounted", `\n      - type: bind\n        source: /run/libvirt\n        target: /run/libvirt\n`},
		{"no host path made up at up", `\n        bind:\n          create_host_path: false\n`},
		{"the socket inside the mounted directory", `\n      VIRTBUS_LIBVIRT_SOCKET: /run/libvirt/libvirt-sock\n`},
		{"the state directory a volume", `\n      - [\w-]+:/var/lib/virtbus\n`},
		{"the health check", `\n    healthcheck:\n      test: \["CMD", "` + regexp.QuoteMeta(bin) + `", "-healthcheck"\]\n`},
	} {
		if !regexp.MustCompile(c.re).MatchString(w) {
			t.Errorf("docker-compose.yml worker: no %s (%s)", c.what, c.re)
		}
	}
	// A file mount of the socket goes stale when libvirtd re-creates it.
	if strings.Contains(w, "libvirt-sock:") {
		t.Error("docker-compose.yml worker: mounts the libvirt socket file, not its directory")
	}
	if strings.Contains(w, "user: root") || strings.Contains(w, `user: "0`) {
		t.Error("docker-compose.yml worker: runs as root")
	}
}

// grafanaDashboard is the part of deploy/grafana-dashboard.json the test
// reads.
type grafanaDashboard struct {
	Templating struct {
		List []struct {
			Name       string `json:"name"`
			Type       string `json:"type"`
			Definition string `json:"definition"`
		} `json:"list"`
	} `json:"templating"`
	Panels []struct {
		Title   string `json:"title"`
		Targets []struct {
			Expr string `json:"expr"`
		} `json:"targets"`
	} `json:"panels"`
}

// exportedMetrics is every series name a worker's /metrics serves: its
// registry, built as run builds it, on a NATS server without JetStream
// (nothing is set up before Run) and a libvirt connection never opened.
func exportedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	nc := bustest.Connect(t, bustest.RunCoreServer(t).ClientURL())
	cfg, err := loadConfig(env{"VIRTBUS_HOST": "hv-deploy-test"}.getenv)
	if err != nil {
		t.Fatal(err)
	}
	log, reg := slog.New(slog.DiscardHandler), newRegistry()
	conn := vm.NewConn(cfg.LibvirtSocket, cfg.LibvirtURI, cfg.LibvirtTimeout, log)
	watcher := vm.NewWatcher(conn, log)
	w, err := newBusWorker(cfg, nc, vm.NewExecutor(conn, vm.Config{View: watcher}, log), log, reg)
	if err != nil {
		t.Fatal(err)
	}
	watchLibvirt(conn, w, reg)
	if _, err := newStateFeed(cfg, nc, watcher, w, log, reg); err != nil {
		t.Fatal(err)
	}
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	names := map[string]bool{}
	for _, mf := range mfs {
		names[mf.GetName()] = true
		if mf.GetType().String() == "HISTOGRAM" {
			for _, suffix := range []string{"_bucket", "_sum", "_count"} {
				names[mf.GetName()+suffix] = true
			}
		}
	}
	return names
}

// exprMetrics is the metric names a PromQL expression selects: what is
// left once strings, label matchers, ranges, label lists, function calls
// and operators are taken out.
func exprMetrics(expr string) []string {
	for _, re := range []string{`"(\\.|[^"\\])*"`, `\{[^}]*\}`, `\[[^\]]*\]`, `\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)`} {
		expr = regexp.MustCompile(re).ReplaceAllString(expr, " ")
	}
	var out []string
	for _, m := range regexp.MustCompile(`[A-Za-z_:][A-Za-z0-9_:]*(\s*\()?`).FindAllString(expr, -1) {
		switch {
		case strings.HasSuffix(m, "("): // a function
		case slices.Contains([]string{"and", "or", "unless", "offset", "bool"}, m):
		default:
			out = append(out, m)
		}
	}
	return out
}

// Every panel of the dashboard selects only series the worker exports (or
// Prometheus's own up of the worker's scrape job), and only the host the
// dashboard's host variable picks.
func TestDeployDashboard(t *testing.T) {
	t.Parallel()
	b, err := os.ReadFile("../../deploy/grafana-dashboard.json")
	if err != nil {
		t.Fatal(err)
	}
	var d grafanaDashboard
	if err := json.Unmarshal(b, &d); err != nil {
		t.Fatalf("deploy/grafana-dashboard.json: %v", err)
	}
	prom, err := os.ReadFile("../../deploy/prometheus.yml")
	if err != nil {
		t.Fatal(err)
	}
	job := regexp.MustCompile(`(?m)^\s*- job_name: (\S+)$`).FindSubmatch(prom)
	if job == nil {
		t.Fatal("deploy/prometheus.yml: no job_name")
	}
	upOfJob := `up{job="` + string(job[1]) + `"`
	i := slices.IndexFunc(d.Templating.List, func(v struct {
		Name       string `json:"name"`
		Type       string `json:"type"`
		Definition string `json:"definition"`
	}) bool {
		return v.Name == "host"
	})
	if i < 0 {
		t.Fatal("dashboard: no host variable")
	}
	if def := d.Templating.List[i].Definition; !strings.HasPrefix(def, "label_values(") || !strings.HasSuffix(def, ", host)") {
		t.Errorf("dashboard: host variable is %q, want label_values(…, host)", def)
	}
	exported := exportedMetrics(t)
	domains := false
	for _, p := range d.Panels {
		if len(p.Targets) == 0 {
			t.Errorf("panel %q: no query", p.Title)
		}
		for _, tg := range p.Targets {
			names := exprMetrics(tg.Expr)
			if len(names) == 0 {
				t.Errorf("panel %q: %q selects no metric", p.Title, tg.Expr)
			}
			for _, n := range names {
				switch {
				case n == "up" && strings.Contains(tg.Expr, upOfJob):
				case n == "up":
					t.Errorf("panel %q: %q: up without %s}", p.Title, tg.Expr, upOfJob)
				case !exported[n]:
					t.Errorf("panel %q: %q: the worker exports no %s", p.Title, tg.Expr, n)
				}
			}
			// Every selector, not just one, keeps to the chosen hosts.
			if sel, host := strings.Count(tg.Expr, "{"), strings.Count(tg.Expr, `host=~"$host"`); sel == 0 || sel != host {
				t.Errorf("panel %q: %q: %d selectors, %d of them with host=~\"$host\"", p.Title, tg.Expr, sel, host)
			}
			domains = domains || slices.Contains(names, "virtbus_domains")
		}
	}
	if !domains {
		t.Error("dashboard: no panel shows virtbus_domains")
	}
}
