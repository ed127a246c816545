// Package envload fills a configuration struct with envconfig from an
// environment given as a function, so that a program's run function can
// take its environment as a parameter (tests run several workers in one
// process, each with an environment of its own) while envconfig does all
// the parsing, the defaults and the usage text.
//
// envconfig reads only the process environment. Load therefore relays the
// variables the function gives into the process environment under a
// prefix unique to the call, has envconfig read them from there, and
// removes them again. Nothing else reads those names, so calls may run side
// by side, and the program's own variables are never changed.
//
// Fields name their variables with envconfig's split_words rule (or their
// plain names), never with an `envconfig:"NAME"` tag: envconfig falls back
// from a missing PREFIX_NAME to a bare NAME, which would let an unrelated
// variable such as HOST or LOG_LEVEL in the environment configure the
// program.
package envload

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync/atomic"

	"github.com/kelseyhightower/envconfig"
)

var calls atomic.Uint64

// Load fills spec, a pointer to a struct with envconfig tags, from the
// variables prefix_* that getenv returns; an empty value counts as unset,
// so the field's default applies. A value that does not parse is an error
// naming the variable.
func Load(prefix string, getenv func(string) string, spec any) error {
	prefix = strings.ToUpper(prefix)
	relay := fmt.Sprintf("ENVLOAD%d_%s", calls.Add(1), prefix)
	keys, err := Keys(relay, spec)
	if err != nil {
		return err
	}
	for _, key := range keys {
		name := prefix + strings.TrimPrefix(key, relay)
		if v := getenv(name); v != "" {
			if err := os.Setenv(key, v); err != nil {
				return fmt.Errorf("relay %s: %w", name, err)
			}
			defer os.Unsetenv(key)
		}
	}
	err = envconfig.Process(relay, spec)
	if perr := (*envconfig.ParseError)(nil); errors.As(err, &perr) {
		why := perr.Err
		if num := (*strconv.NumError)(nil); errors.As(why, &num) && strings.HasPrefix(perr.TypeName, "int") {
			why = errors.New("not a whole number") // rather than strconv's words
		}
		return fmt.Errorf("%s%s=%q: %w", prefix, strings.TrimPrefix(perr.KeyName, relay), perr.Value, why)
	}
	return err
}

// Keys lists the variables envconfig reads for spec under prefix, as its
// usage text names them.
func Keys(prefix string, spec any) ([]string, error) {
	var b bytes.Buffer
	if err := envconfig.Usagef(prefix, spec, &b, "{{range .}}{{usage_key .}}\n{{end}}"); err != nil {
		return nil, fmt.Errorf("list the variables: %w", err)
	}
	return strings.Fields(b.String()), nil
}
