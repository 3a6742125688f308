package deploy

// The chart's Grafana dashboard ConfigMap and PrometheusRule: rendered only when enabled, the
// dashboard is the chart's files/dashboard.json under the sidecar's label, and the alerts pass
// `promtool check rules` and the rule unit tests of alerts_test.yaml, each with a runbook_url whose
// anchor is a heading of docs/operations.md. (That every meshgate_* name in both exists in a
// running gateway's /metrics is tests/integration/test_dashboard.c.)

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/yaml"
)

const minimalValues = "values/minimal.yaml"

func dashboardConfigMap(m *Manifest) *corev1.ConfigMap {
	for _, o := range m.Objects {
		if cm, ok := o.Typed.(*corev1.ConfigMap); ok && strings.HasSuffix(cm.Name, "-dashboard") {
			return cm
		}
	}
	return nil
}

func TestGrafanaDashboard(t *testing.T) {
	if cm := dashboardConfigMap(render(t, minimalValues)); cm != nil {
		t.Fatalf("dashboard ConfigMap %s rendered with grafana.dashboards.enabled unset", cm.Name)
	}
	want, err := os.ReadFile(filepath.Join(ChartDir, "files/dashboard.json"))
	if err != nil {
		t.Fatal(err)
	}
	cases := map[string]struct {
		sets             []string
		label, value, ns string
	}{
		"default label": {[]string{"grafana.dashboards.enabled=true"}, "grafana_dashboard", "1", ns},
		"own label and namespace": {[]string{"grafana.dashboards.enabled=true", "grafana.dashboards.label=dash",
			"grafana.dashboards.labelValue=meshgate", "grafana.dashboards.namespace=monitoring"}, "dash", "meshgate", "monitoring"},
	}
	for name, c := range cases {
		t.Run(name, func(t *testing.T) {
			cm := dashboardConfigMap(render(t, minimalValues, c.sets...))
			if cm == nil {
				t.Fatal("no dashboard ConfigMap")
			}
			if got := cm.Labels[c.label]; got != c.value {
				t.Errorf("label %s=%q, want %q", c.label, got, c.value)
			}
			if cm.Namespace != c.ns {
				t.Errorf("namespace %q, want %q", cm.Namespace, c.ns)
			}
			body := cm.Data["meshgate.json"]
			if strings.TrimSpace(body) != strings.TrimSpace(string(want)) {
				t.Errorf("meshgate.json differs from files/dashboard.json")
			}
			var d struct {
				UID    string `json:"uid"`
				Panels []struct {
					Type    string `json:"type"`
					Title   string `json:"title"`
					Targets []struct {
						Expr string `json:"expr"`
					} `json:"targets"`
				} `json:"panels"`
			}
			if err := json.Unmarshal([]byte(body), &d); err != nil {
				t.Fatalf("meshgate.json: %v", err)
			}
			if d.UID == "" {
				t.Error("dashboard has no uid (the sidecar would duplicate it on every reload)")
			}
			n := 0
			for _, p := range d.Panels {
				if p.Type == "row" {
					continue
				}
				if len(p.Targets) == 0 {
					t.Errorf("panel %q has no query", p.Title)
				}
				for _, q := range p.Targets {
					if !strings.Contains(q.Expr, "meshgate_") {
						t.Errorf("panel %q query names no meshgate metric: %s", p.Title, q.Expr)
					}
				}
				n++
			}
			if n < 10 {
				t.Errorf("%d panels, want the dashboard of issue 16 (>= 10)", n)
			}
		})
	}
}

// anchors returns the GitHub anchors of docs/operations.md's headings.
func anchors(t *testing.T) map[string]bool {
	t.Helper()
	doc, err := os.ReadFile("../../docs/operations.md")
	if err != nil {
		t.Fatal(err)
	}
	drop := regexp.MustCompile(`[^a-z0-9 _-]`)
	out := map[string]bool{}
	for _, line := range strings.Split(string(doc), "\n") {
		if !strings.HasPrefix(line, "#") {
			continue
		}
		h := strings.ToLower(strings.TrimSpace(strings.TrimLeft(line, "#")))
		out[strings.ReplaceAll(drop.ReplaceAllString(h, ""), " ", "-")] = true
	}
	return out
}

func TestPrometheusRule(t *testing.T) {
	if n := count(render(t, minimalValues), "PrometheusRule"); n != 0 {
		t.Fatalf("%d PrometheusRule rendered with prometheusRule.enabled unset", n)
	}
	const base = "https://example.test/ops.md"
	m := render(t, minimalValues, "prometheusRule.enabled=true", "prometheusRule.runbookBaseUrl="+base,
		"prometheusRule.labels.release=kps")
	rules := All[*PrometheusRule](m)
	if len(rules) != 1 {
		t.Fatalf("%d PrometheusRules, want 1", len(rules))
	}
	pr := rules[0]
	if pr.Metadata.Labels["release"] != "kps" {
		t.Errorf("prometheusRule.labels not applied: %v", pr.Metadata.Labels)
	}
	want := []string{"MeshgateKafkaConsumerLagGrowing", "MeshgatePeerDegraded", "MeshgateFailedSends",
		"MeshgateSlowConsumerSpike", "MeshgatePresenceStoreErrors", "MeshgateReadinessFlapping"}
	have := map[string]bool{}
	docs := anchors(t)
	for _, g := range pr.Spec.Groups {
		for _, r := range g.Rules {
			have[r.Alert] = true
			url := r.Annotations["runbook_url"]
			anchor := strings.ToLower(r.Alert)
			if url != base+"#"+anchor {
				t.Errorf("%s: runbook_url %q, want %s#%s", r.Alert, url, base, anchor)
			}
			if !docs[anchor] {
				t.Errorf("%s: docs/operations.md has no heading %q", r.Alert, r.Alert)
			}
			if r.Labels["severity"] == "" || r.Annotations["summary"] == "" {
				t.Errorf("%s: want a severity label and a summary", r.Alert)
			}
			if strings.Contains(r.Expr, "MESHGATE_POD_REGEX") {
				t.Errorf("%s: placeholder left in expr", r.Alert)
			}
		}
	}
	for _, a := range want {
		if !have[a] {
			t.Errorf("alert %s missing", a)
		}
	}

	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatal("promtool not found (Debian package prometheus, tests/infra/install-deps.sh)")
	}
	dir := t.TempDir()
	spec, err := yaml.Marshal(pr.Spec)
	if err != nil {
		t.Fatal(err)
	}
	unit, err := os.ReadFile("alerts_test.yaml")
	if err != nil {
		t.Fatal(err)
	}
	unit = []byte(strings.ReplaceAll(string(unit), "https://example.test/ops.md", base))
	if err := os.WriteFile(filepath.Join(dir, "alerts.yaml"), spec, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "alerts_test.yaml"), unit, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{{"check", "rules", "alerts.yaml"}, {"test", "rules", "alerts_test.yaml"}} {
		cmd := exec.Command(promtool, args...)
		cmd.Dir = dir
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
}

// A broken rule must fail promtool (so the check above can fail).
func TestPromtoolCatchesBadRule(t *testing.T) {
	promtool, err := exec.LookPath("promtool")
	if err != nil {
		t.Fatal("promtool not found")
	}
	dir := t.TempDir()
	bad := "groups:\n  - name: x\n    rules:\n      - alert: Bad\n        expr: sum by (pod (meshgate_ws_connections)\n"
	if err := os.WriteFile(filepath.Join(dir, "bad.yaml"), []byte(bad), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command(promtool, "check", "rules", filepath.Join(dir, "bad.yaml")).CombinedOutput(); err == nil {
		t.Errorf("promtool accepted a malformed expression:\n%s", out)
	}
}
