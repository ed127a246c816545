package bus

import (
	"strings"
	"testing"
	"time"

	"github.com/nats-io/nats.go"
)

func TestDecode(t *testing.T) {
	t.Parallel()
	long := func(n int) string { return strings.Repeat("a", n) }
	tests := []struct {
		name        string
		subject     string
		id          string
		body        string
		reply       string
		wantID      string // "" when the worker must make one
		wantVM      string
		wantAction  string
		wantParams  string
		wantReply   string
		wantInvalid bool
	}{
		{name: "object", subject: "virtbus.cmd.hv1.web-1.stop", body: `{"mode":"force"}`, wantVM: "web-1", wantAction: "stop", wantParams: `{"mode":"force"}`},
		{name: "empty body", subject: "virtbus.cmd.hv1.web-1.start", body: ``, wantVM: "web-1", wantAction: "start", wantParams: `{}`},
		{name: "white space body", subject: "virtbus.cmd.hv1.web-1.start", body: " \n", wantVM: "web-1", wantAction: "start", wantParams: `{}`},
		{name: "padded object", subject: "virtbus.cmd.hv1.web-1.start", body: ` {"a":1} `, wantVM: "web-1", wantAction: "start", wantParams: `{"a":1}`},
		{name: "inbox reply", subject: "virtbus.cmd.hv1.web-1.start", reply: "_INBOX.abc", wantVM: "web-1", wantAction: "start", wantParams: `{}`, wantReply: "_INBOX.abc"},
		{name: "tenant inbox reply", subject: "virtbus.cmd.hv1.web-1.start", reply: "_INBOX_tenant-a.abc.1", wantVM: "web-1", wantAction: "start", wantParams: `{}`, wantReply: "_INBOX_tenant-a.abc.1"},
		{name: "virtbus reply", subject: "virtbus.cmd.hv1.web-1.start", reply: "virtbus.reply.svc.7", wantVM: "web-1", wantAction: "start", wantParams: `{}`, wantReply: "virtbus.reply.svc.7"},
		{name: "id at the bound", subject: "virtbus.cmd.hv1.web-1.start", id: long(MaxIDLen), wantID: long(MaxIDLen), wantVM: "web-1", wantAction: "start", wantParams: `{}`},
		{name: "malformed", subject: "virtbus.cmd.hv1.web-1.start", body: `{"a":`, wantVM: "web-1", wantAction: "start", wantParams: `{}`, wantInvalid: true},
		{name: "array", subject: "virtbus.cmd.hv1.web-1.start", body: `[]`, wantVM: "web-1", wantAction: "start", wantParams: `{}`, wantInvalid: true},
		{name: "null", subject: "virtbus.cmd.hv1.web-1.start", body: `null`, wantVM: "web-1", wantAction: "start", wantParams: `{}`, wantInvalid: true},
		{name: "trailing garbage", subject: "virtbus.cmd.hv1.web-1.start", body: `{} {}`, wantVM: "web-1", wantAction: "start", wantParams: `{}`, wantInvalid: true},
		{name: "too many tokens", subject: "virtbus.cmd.hv1.web-1.start.now", wantVM: InvalidToken, wantAction: InvalidToken, wantParams: `{}`, wantInvalid: true},
		{name: "vm too long", subject: "virtbus.cmd.hv1." + long(MaxTokenLen+1) + ".start", wantVM: InvalidToken, wantAction: "start", wantParams: `{}`, wantInvalid: true},
		{name: "action too long", subject: "virtbus.cmd.hv1.web-1." + long(4000), wantVM: "web-1", wantAction: InvalidToken, wantParams: `{}`, wantInvalid: true},
		{name: "control character in vm", subject: "virtbus.cmd.hv1.web\x01.start", wantVM: InvalidToken, wantAction: "start", wantParams: `{}`, wantInvalid: true},
		{name: "id too long", subject: "virtbus.cmd.hv1.web-1.start", id: long(4050), wantVM: "web-1", wantAction: "start", wantParams: `{}`, wantInvalid: true},
		{name: "id with a space", subject: "virtbus.cmd.hv1.web-1.start", id: "a b", wantVM: "web-1", wantAction: "start", wantParams: `{}`, wantInvalid: true},
		{name: "id in the worker's space", subject: "virtbus.cmd.hv1.web-1.start", id: "~1-2", wantVM: "web-1", wantAction: "start", wantParams: `{}`, wantInvalid: true},
		{name: "reply with wildcards", subject: "virtbus.cmd.hv1.web-1.start", reply: "_INBOX.*", wantVM: "web-1", wantAction: "start", wantParams: `{}`, wantInvalid: true},
		{name: "reply into a KV bucket", subject: "virtbus.cmd.hv1.web-1.stop", reply: "$KV.VIRTBUS_DONE.hv1.victim", wantVM: "web-1", wantAction: "stop", wantParams: `{}`, wantInvalid: true},
		{name: "reply into the JetStream API", subject: "virtbus.cmd.hv1.web-1.stop", reply: "$JS.API.STREAM.DELETE.VIRTBUS_CMD", wantVM: "web-1", wantAction: "stop", wantParams: `{}`, wantInvalid: true},
		{name: "reply onto a command subject", subject: "virtbus.cmd.hv1.web-1.stop", reply: "virtbus.cmd.hv1.web-2.stop", wantVM: "web-1", wantAction: "stop", wantParams: `{}`, wantInvalid: true},
		{name: "reply onto an event subject", subject: "virtbus.cmd.hv1.web-1.stop", reply: "virtbus.evt.hv1.web-2.stop", wantVM: "web-1", wantAction: "stop", wantParams: `{}`, wantInvalid: true},
		{name: "reply into the worker's inbox", subject: "virtbus.cmd.hv1.web-1.stop", reply: WorkerInboxPrefix("hv1") + ".x.y", wantVM: "web-1", wantAction: "stop", wantParams: `{}`, wantInvalid: true},
		{name: "reply too long", subject: "virtbus.cmd.hv1.web-1.stop", reply: "_INBOX." + long(MaxReplyLen), wantVM: "web-1", wantAction: "stop", wantParams: `{}`, wantInvalid: true},
	}
	w := &Worker{log: testLogger(t), cfg: Config{Host: "hv1", ReplyPrefixes: DefaultConfig().ReplyPrefixes}}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			hdr := nats.Header{}
			if tc.id == "" && tc.wantID == "" && !tc.wantInvalid {
				tc.id, tc.wantID = "id-1", "id-1"
			}
			if tc.id != "" {
				hdr.Set(HeaderMsgID, tc.id)
			}
			if tc.reply != "" {
				hdr.Set(HeaderReply, tc.reply)
			}
			j := w.decode(tc.subject, hdr, []byte(tc.body), time.Now())
			if (j.invalid != nil) != tc.wantInvalid {
				t.Fatalf("invalid = %v, want %v", j.invalid, tc.wantInvalid)
			}
			if j.invalid != nil && (j.invalid.Code != CodeInvalid || len(j.invalid.Message) > 512) {
				t.Errorf("error %.600v: want code invalid and a bounded message", j.invalid)
			}
			c := j.cmd
			if c.VM != tc.wantVM || c.Action != tc.wantAction || string(c.Params) != tc.wantParams ||
				c.Reply != tc.wantReply || c.Attempt != 1 {
				t.Errorf("command %+v (params %s)", c, c.Params)
			}
			if c.ID != tc.wantID {
				t.Errorf("id %.140q, want %.140q", c.ID, tc.wantID)
			}
			if j.key != tc.wantVM {
				t.Errorf("queue key %q, want the VM %q", j.key, tc.wantVM)
			}
		})
	}
}

func TestRecordKey(t *testing.T) {
	t.Parallel()
	tests := []struct {
		host, id, want string
	}{
		{"hv1", "01J9ZQ3K", "hv1.01J9ZQ3K"},
		{"hv1", "cmd_7-b", "hv1.cmd_7-b"},
		{"hv1", "a.b", "hv1.=YS5i"},
		{"hv1", "=YS5i", "hv1.=PVlTNWk"}, // a plain id that looks encoded is encoded too
		{"hv1", "späť/1", "hv1.=c3DDpMWlLzE"},
		{"hv1", "", "hv1.="},
	}
	seen := map[string]string{}
	for _, tc := range tests {
		got := recordKey(tc.host, tc.id)
		if got != tc.want {
			t.Errorf("recordKey(%q, %q) = %q, want %q", tc.host, tc.id, got, tc.want)
		}
		if other, dup := seen[got]; dup {
			t.Errorf("ids %q and %q share key %q", other, tc.id, got)
		}
		seen[got] = tc.id
		if strings.ContainsFunc(got, func(r rune) bool {
			return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || strings.ContainsRune("-_=.", r))
		}) {
			t.Errorf("key %q has characters a KV key may not", got)
		}
	}
}

func TestConfigDefaults(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name    string
		in      Config
		check   func(Config) bool
		wantErr string
	}{
		{name: "defaults", in: Config{Host: "hv1"}, check: func(c Config) bool {
			return c.Delivery == DeliveryJetStream && c.QueueSize == 64 && c.Concurrency == 1 && c.MaxDeliver == 5 &&
				c.AckWait == 30*time.Second && c.DupWindow == 2*time.Minute && c.RecordTTL == 24*time.Hour &&
				c.RetryBackoff == time.Second && c.RetryBackoffMax == 30*time.Second
		}},
		{name: "kept", in: Config{Host: "hv1", Delivery: DeliveryCore, QueueSize: 3, Concurrency: 2, MaxDeliver: 9}, check: func(c Config) bool {
			return c.Delivery == DeliveryCore && c.QueueSize == 3 && c.Concurrency == 2 && c.MaxDeliver == 9
		}},
		{name: "no host", in: Config{}, wantErr: "host"},
		{name: "host with a dot", in: Config{Host: "hv1.example"}, wantErr: "host"},
		{name: "unknown delivery", in: Config{Host: "hv1", Delivery: "push"}, wantErr: "delivery"},
		{name: "negative queue", in: Config{Host: "hv1", QueueSize: -1}, wantErr: "queue size"},
		{name: "negative ack wait", in: Config{Host: "hv1", AckWait: -time.Second}, wantErr: "ack wait"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.in.withDefaults()
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("err = %v, want one about %s", err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !tc.check(got) {
				t.Errorf("config %+v", got)
			}
		})
	}
}

func TestBackoff(t *testing.T) {
	t.Parallel()
	w := &Worker{cfg: Config{RetryBackoff: time.Second, RetryBackoffMax: 5 * time.Second}}
	for attempt, want := range map[int]time.Duration{1: time.Second, 2: 2 * time.Second, 3: 4 * time.Second, 4: 5 * time.Second, 40: 5 * time.Second} {
		if got := w.retryDelay(attempt); got != want {
			t.Errorf("retryDelay(%d) = %s, want %s", attempt, got, want)
		}
	}
}
