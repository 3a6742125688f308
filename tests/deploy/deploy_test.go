package deploy

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"google.golang.org/protobuf/types/known/durationpb"
	netv1b1 "istio.io/api/networking/v1beta1"
	secv1b1 "istio.io/api/security/v1beta1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
)

const ns = "messaging"

// What each values file under values/ must render, beyond the common checks.
var scenarios = map[string]struct {
	hpa, connections, istio, serviceMonitor, networkPolicy bool
}{
	"minimal":        {},
	"production":     {hpa: true, connections: true, networkPolicy: true},
	"istio":          {hpa: true, istio: true},
	"servicemonitor": {istio: true, serviceMonitor: true},
}

func valuesFiles(t *testing.T) []string {
	t.Helper()
	files, err := filepath.Glob("values/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no values files under values/: %v", err)
	}
	for _, f := range files {
		name := strings.TrimSuffix(filepath.Base(f), ".yaml")
		if _, ok := scenarios[name]; !ok {
			t.Fatalf("values/%s.yaml has no scenario in deploy_test.go", name)
		}
	}
	return files
}

func render(t *testing.T, values string, sets ...string) *Manifest {
	t.Helper()
	out, err := Template(ns, []string{values}, sets...)
	if err != nil {
		t.Fatal(err)
	}
	m, err := Parse(ns, out)
	if err != nil {
		t.Fatalf("%s: %v", values, err)
	}
	return m
}

func count(m *Manifest, kind string) int {
	n := 0
	for _, o := range m.Objects {
		if o.Kind == kind {
			n++
		}
	}
	return n
}

func TestLint(t *testing.T) {
	for _, f := range valuesFiles(t) {
		t.Run(filepath.Base(f), func(t *testing.T) {
			if _, err := Helm("lint", "--strict", ChartDir, "--namespace", ns, "--kube-version", KubeVersion, "--values", f); err != nil {
				t.Fatal(err)
			}
		})
	}
}

func TestRender(t *testing.T) {
	for _, f := range valuesFiles(t) {
		name := strings.TrimSuffix(filepath.Base(f), ".yaml")
		want := scenarios[name]
		t.Run(name, func(t *testing.T) {
			m := render(t, f)
			if err := RunChecks(m); err != nil {
				t.Fatal(err)
			}
			has := func(kind string, want bool) {
				if got := count(m, kind) > 0; got != want {
					t.Errorf("%s rendered: %v, want %v", kind, got, want)
				}
			}
			has("HorizontalPodAutoscaler", want.hpa)
			has("PeerAuthentication", want.istio)
			has("AuthorizationPolicy", want.istio)
			has("DestinationRule", want.istio)
			has("Sidecar", want.istio)
			has("ServiceMonitor", want.serviceMonitor)
			has("PrometheusRule", want.serviceMonitor)
			has("NetworkPolicy", want.networkPolicy)
			if HasConnectionsMetric(m) != want.connections {
				t.Errorf("HPA on %s: %v, want %v", ConnectionsMetric, !want.connections, want.connections)
			}
			for _, k := range []string{"ConfigMap", "ServiceAccount", "Deployment"} {
				has(k, true)
			}
			if count(m, "Service") != 2 {
				t.Errorf("want 2 Services (clients, headless peer), got %d", count(m, "Service"))
			}
		})
	}
}

// A misspelt or unknown values key must fail helm template (values.schema.json).
func TestValuesTypoFails(t *testing.T) {
	cases := map[string]struct {
		sets []string
		want string // in helm's error, so the failure is for this reason
	}{
		"top-level typo":      {[]string{"regoin=eu-west-1"}, "Additional property regoin is not allowed"},
		"nested typo":         {[]string{"autoscaling.minReplica=2"}, "Additional property minReplica is not allowed"},
		"deep typo":           {[]string{"istio.destinationRule.outlierDetection.interva=5s"}, "Additional property interva is not allowed"},
		"wrong type":          {[]string{"gateway.drainSeconds=soon"}, "drainSeconds"},
		"bad enum":            {[]string{"gateway.logFormat=xml"}, "logFormat"},
		"bad host:port":       {[]string{"redis.nodes[0]=redis-without-port"}, "redis.nodes"},
		"root allowed":        {[]string{"securityContext.readOnlyRootFilesystem=false"}, "readOnlyRootFilesystem"},
		"hour duration":       {[]string{"istio.destinationRule.idleTimeout=24h"}, "idleTimeout"},
		"no region (fail())":  {[]string{"region="}, "region is required"},
		"grace below drain":   {[]string{"lifecycle.terminationGracePeriodSeconds=5"}, "must be at least"},
		"memory presence+HPA": {[]string{"gateway.presence=memory", "autoscaling.enabled=true"}, "single gateway"},
		"sentinel, no nodes":  {[]string{"gateway.presence=redis-sentinel"}, "needs redis.sentinel.nodes"},
		"bad sentinel addr":   {[]string{"gateway.presence=redis-sentinel", "redis.sentinel.nodes[0]=s0"}, "redis.sentinel.nodes"},
	}
	for name, tc := range cases {
		t.Run(name, func(t *testing.T) {
			_, err := Template(ns, []string{"values/production.yaml"}, tc.sets...)
			if err == nil {
				t.Fatalf("helm template accepted %v", tc.sets)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("failed, but not for %q: %v", tc.want, err)
			}
		})
	}
	// Same through a values file, as a user would write it.
	dir := t.TempDir()
	bad := filepath.Join(dir, "typo.yaml")
	if err := os.WriteFile(bad, []byte("autoscaling:\n  enabled: true\n  maxReplica: 10\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	_, err := Template(ns, []string{"values/production.yaml", bad})
	if err == nil || !strings.Contains(err.Error(), "maxReplica") {
		t.Fatalf("typo'd values file not rejected by name: %v", err)
	}
}

// The schema is closed at every level and self-contained.
func TestSchemaClosed(t *testing.T) {
	raw, err := os.ReadFile(filepath.Join(ChartDir, "values.schema.json"))
	if err != nil {
		t.Fatal(err)
	}
	var s any
	if err := json.Unmarshal(raw, &s); err != nil {
		t.Fatal(err)
	}
	for _, p := range schemaProblems(s, "") {
		t.Error(p)
	}
	// And the checker itself catches an open object and a remote $ref.
	open := map[string]any{"type": "object", "properties": map[string]any{
		"a": map[string]any{"type": "object", "properties": map[string]any{}},
		"b": map[string]any{"$ref": "https://example.com/k8s.json"},
	}, "additionalProperties": false}
	if n := len(schemaProblems(open, "")); n != 2 {
		t.Errorf("schemaProblems found %d problems in a schema with 2", n)
	}
}

// schemaProblems lists objects without additionalProperties: false and non-local $refs.
// "global" is exempt: Helm hands a parent chart's globals to its subcharts.
func schemaProblems(node any, path string) []string {
	var out []string
	switch n := node.(type) {
	case map[string]any:
		if ref, ok := n["$ref"].(string); ok && !strings.HasPrefix(ref, "#") {
			out = append(out, path+": remote $ref "+ref)
		}
		if props, ok := n["properties"].(map[string]any); ok || n["type"] == "object" {
			ap, has := n["additionalProperties"]
			closed := has && (ap == false || isTypedMap(ap))
			if !closed && path != "/global" {
				out = append(out, path+": object without additionalProperties: false")
			}
			for k, v := range props {
				out = append(out, schemaProblems(v, path+"/"+k)...)
			}
		}
		for _, k := range []string{"items", "oneOf", "anyOf", "allOf", "additionalProperties"} {
			if v, ok := n[k]; ok {
				out = append(out, schemaProblems(v, path+"/"+k)...)
			}
		}
	case []any:
		for _, v := range n {
			out = append(out, schemaProblems(v, path)...)
		}
	}
	return out
}

// isTypedMap: {"type": "string"} as additionalProperties (labels, annotations) is closed too.
func isTypedMap(ap any) bool {
	m, ok := ap.(map[string]any)
	return ok && m["type"] == "string"
}

// Each check must be able to fail: mutate a good rendering and expect the error.
func TestChecksCatchMistakes(t *testing.T) {
	base := func(t *testing.T) *Manifest { return render(t, "values/istio.yaml") }
	dep := func(m *Manifest) *appsv1.Deployment { return All[*appsv1.Deployment](m)[0] }
	ctr := func(m *Manifest) *corev1.Container { c, _ := gatewayContainer(dep(m)); return c }
	svc := func(m *Manifest, headless bool) *corev1.Service {
		for _, s := range All[*corev1.Service](m) {
			if (s.Spec.ClusterIP == corev1.ClusterIPNone) == headless {
				return s
			}
		}
		return nil
	}
	cases := []struct {
		name   string
		check  func(*Manifest) error
		mutate func(*Manifest)
	}{
		{"grpc port named tcp-grpc (Istio treats it as TCP)", CheckServicePorts, func(m *Manifest) {
			svc(m, false).Spec.Ports[1].Name = "tcp-grpc"
		}},
		{"grpc port without appProtocol, unprefixed name (sniffed)", CheckServicePorts, func(m *Manifest) {
			p := &svc(m, false).Spec.Ports[1]
			p.Name, p.AppProtocol = "api", nil
		}},
		{"grpc port with appProtocol http", CheckServicePorts, func(m *Manifest) {
			p := &svc(m, false).Spec.Ports[1]
			ap := "http"
			p.Name, p.AppProtocol = "http-grpc", &ap
		}},
		{"websocket port named ws", CheckServicePorts, func(m *Manifest) {
			svc(m, false).Spec.Ports[0].Name = "ws"
		}},
		{"env variable the gateway does not read", CheckEnv, func(m *Manifest) {
			c := ctr(m)
			c.Env = append(c.Env, corev1.EnvVar{Name: "MESHGATE_CONSUL_ADDR", Value: "consul:8500"})
		}},
		{"no headless peer service", CheckHeadlessPeer, func(m *Manifest) {
			m.Remove("Service", func(o *Object) bool { return o.Typed.(*corev1.Service).Spec.ClusterIP == "None" })
		}},
		{"peer service not headless", CheckHeadlessPeer, func(m *Manifest) {
			svc(m, true).Spec.ClusterIP = ""
		}},
		{"peer service without grpc port", CheckHeadlessPeer, func(m *Manifest) {
			svc(m, true).Spec.Ports[0].Port = 9999
		}},
		{"liveness on HTTP /healthz", CheckProbes, func(m *Manifest) {
			c := ctr(m)
			c.LivenessProbe.GRPC = nil
			c.LivenessProbe.HTTPGet = &corev1.HTTPGetAction{Path: "/healthz"}
		}},
		{"readiness probe missing", CheckProbes, func(m *Manifest) { ctr(m).ReadinessProbe = nil }},
		{"startup probe on the websocket port", CheckProbes, func(m *Manifest) { ctr(m).StartupProbe.GRPC.Port = 8080 }},
		{"peer authority unset", CheckPeerAuthority, func(m *Manifest) {
			for _, cm := range All[*corev1.ConfigMap](m) {
				delete(cm.Data, "MESHGATE_PEER_AUTHORITY")
			}
		}},
		{"peer authority names the ClusterIP service", CheckPeerAuthority, func(m *Manifest) {
			for _, cm := range All[*corev1.ConfigMap](m) {
				cm.Data["MESHGATE_PEER_AUTHORITY"] = "meshgate.messaging.svc.cluster.local:50051"
			}
		}},
		{"advertise address not the pod IP", CheckEnv, func(m *Manifest) {
			c := ctr(m)
			for i := range c.Env {
				if c.Env[i].Name == "MESHGATE_ADVERTISE_ADDR" {
					c.Env[i].Value = "0.0.0.0"
				}
			}
		}},
		{"gRPC listening on loopback", CheckEnv, func(m *Manifest) {
			All[*corev1.ConfigMap](m)[0].Data["MESHGATE_GRPC_LISTEN"] = "127.0.0.1:50051"
		}},
		{"grace period shorter than drain", CheckLifecycle, func(m *Manifest) {
			g := int64(20)
			dep(m).Spec.Template.Spec.TerminationGracePeriodSeconds = &g
		}},
		{"no preStop", CheckLifecycle, func(m *Manifest) { ctr(m).Lifecycle = nil }},
		{"writable root filesystem", CheckSecurity, func(m *Manifest) {
			f := false
			ctr(m).SecurityContext.ReadOnlyRootFilesystem = &f
		}},
		{"capabilities kept", CheckSecurity, func(m *Manifest) { ctr(m).SecurityContext.Capabilities.Drop = nil }},
		{"no config checksum", CheckSecurity, func(m *Manifest) {
			delete(dep(m).Spec.Template.Annotations, "checksum/config")
		}},
		{"HPA CPU as pod Resource", CheckHPA, func(m *Manifest) {
			h := All[*autoscalingv2.HorizontalPodAutoscaler](m)[0]
			h.Spec.Metrics[0] = autoscalingv2.MetricSpec{Type: autoscalingv2.ResourceMetricSourceType,
				Resource: &autoscalingv2.ResourceMetricSource{Name: corev1.ResourceCPU}}
		}},
		{"HPA scales down fast", CheckHPA, func(m *Manifest) {
			h := All[*autoscalingv2.HorizontalPodAutoscaler](m)[0]
			z := int32(0)
			h.Spec.Behavior.ScaleDown.StabilizationWindowSeconds = &z
		}},
		{"HPA on autoscaling/v1", CheckHPA, func(m *Manifest) {
			for i := range m.Objects {
				if m.Objects[i].Kind == "HorizontalPodAutoscaler" {
					m.Objects[i].APIVersion = "autoscaling/v1"
				}
			}
		}},
		{"replicas fixed under HPA", CheckHPA, func(m *Manifest) { r := int32(3); dep(m).Spec.Replicas = &r }},
		{"no PDB", CheckPDB, func(m *Manifest) { m.Remove("PodDisruptionBudget", func(*Object) bool { return true }) }},
		{"mTLS PERMISSIVE", CheckIstio, func(m *Manifest) {
			All[*secv1b1.PeerAuthentication](m)[0].Mtls.Mode = secv1b1.PeerAuthentication_MutualTLS_PERMISSIVE
		}},
		{"no default deny", CheckIstio, func(m *Manifest) {
			m.Remove("AuthorizationPolicy", func(o *Object) bool { return strings.HasSuffix(o.Meta.Name, "-default-deny") })
		}},
		{"GatewayPeer open to a namespace", CheckIstio, func(m *Manifest) {
			for _, ap := range All[*secv1b1.AuthorizationPolicy](m) {
				if len(ap.Rules) > 0 {
					ap.Rules[0].From[0].Source.Namespaces = []string{"orders"}
				}
			}
		}},
		{"GatewayPeer from another service account", CheckIstio, func(m *Manifest) {
			for _, ap := range All[*secv1b1.AuthorizationPolicy](m) {
				if len(ap.Rules) > 0 {
					ap.Rules[0].From[0].Source.Principals = []string{"cluster.local/ns/orders/sa/orders-api"}
				}
			}
		}},
		{"websocket route timeout 15s", CheckIstio, func(m *Manifest) {
			All[*netv1b1.VirtualService](m)[0].Http[0].Timeout = durationpb.New(15e9)
		}},
		{"no outlier detection", CheckIstio, func(m *Manifest) {
			for _, dr := range All[*netv1b1.DestinationRule](m) {
				dr.TrafficPolicy.OutlierDetection = nil
			}
		}},
		{"test pod selected by the Service", CheckTestHook, func(m *Manifest) {
			for _, p := range All[*corev1.Pod](m) {
				for k, v := range dep(m).Spec.Selector.MatchLabels {
					p.Labels[k] = v
				}
			}
		}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			m := base(t)
			if err := tc.check(m); err != nil {
				t.Fatalf("check fails before the mutation: %v", err)
			}
			tc.mutate(m)
			if err := tc.check(m); err == nil {
				t.Fatal("check passed a broken manifest")
			} else {
				t.Logf("caught: %v", err)
			}
		})
	}
}

// The decoder rejects what the API server or istiod would reject or silently drop.
func TestStrictDecoding(t *testing.T) {
	cases := map[string]string{
		"unknown Deployment field": `apiVersion: apps/v1
kind: Deployment
metadata: {name: x}
spec:
  replicas: 1
  selector: {matchLabels: {a: b}}
  template:
    metadata: {labels: {a: b}}
    spec:
      containers:
        - name: meshgate
          image: x
          livenessProbe:
            grpcc: {port: 50051}
`,
		"HPA autoscaling/v1": `apiVersion: autoscaling/v1
kind: HorizontalPodAutoscaler
metadata: {name: x}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: x}
  maxReplicas: 3
  targetCPUUtilizationPercentage: 70
`,
		"HPA v2 metric field of v2beta1": `apiVersion: autoscaling/v2
kind: HorizontalPodAutoscaler
metadata: {name: x}
spec:
  scaleTargetRef: {apiVersion: apps/v1, kind: Deployment, name: x}
  maxReplicas: 3
  metrics:
    - type: Pods
      pods: {metricName: meshgate_ws_connections, targetAverageValue: "100"}
`,
		"duplicate key": `apiVersion: v1
kind: Service
metadata: {name: x, name: y}
`,
		"unknown Istio spec field": `apiVersion: networking.istio.io/v1beta1
kind: VirtualService
metadata: {name: x}
spec:
  hosts: [a]
  http:
    - route: [{destination: {host: a}}]
      timeOut: 0s
`,
		"bad Istio enum": `apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata: {name: x}
spec:
  mtls: {mode: STRICTLY}
`,
		"unknown ServiceMonitor field": `apiVersion: monitoring.coreos.com/v1
kind: ServiceMonitor
metadata: {name: x}
spec:
  selector: {matchLabels: {a: b}}
  endpoints: [{port: http-ws, pathh: /metrics}]
`,
	}
	for name, doc := range cases {
		t.Run(name, func(t *testing.T) {
			if _, err := ParseDocument([]byte(doc)); err == nil {
				t.Fatal("accepted")
			} else {
				t.Logf("rejected: %v", err)
			}
		})
	}
	// The valid twin of the Istio case decodes, so the rejection above is about the field.
	ok := "apiVersion: networking.istio.io/v1beta1\nkind: VirtualService\nmetadata: {name: x}\nspec:\n  hosts: [a]\n  http:\n    - route: [{destination: {host: a}}]\n      timeout: 0s\n"
	if _, err := ParseDocument([]byte(ok)); err != nil {
		t.Fatalf("valid VirtualService rejected: %v", err)
	}
}

// istio/values-istio.yaml on top of the production values renders a release that passes.
func TestIstioOverlay(t *testing.T) {
	out, err := Template(ns, []string{"values/production.yaml", "../../istio/values-istio.yaml"},
		"istio.authorization.messagingServiceAccounts[0]=orders/orders-api")
	if err != nil {
		t.Fatal(err)
	}
	m, err := Parse(ns, out)
	if err != nil {
		t.Fatal(err)
	}
	if err := RunChecks(m); err != nil {
		t.Fatal(err)
	}
	for _, k := range []string{"PeerAuthentication", "AuthorizationPolicy", "DestinationRule", "Gateway", "VirtualService", "Sidecar"} {
		if count(m, k) == 0 {
			t.Errorf("no %s", k)
		}
	}
}

// istio/ holds no manifests of its own: the chart is the one source.
func TestIstioSingleSource(t *testing.T) {
	entries, err := os.ReadDir("../../istio")
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range entries {
		if n := e.Name(); n != "README.md" && n != "values-istio.yaml" {
			t.Errorf("istio/%s: Istio resources live in helm/meshgate/templates/istio only", n)
		}
	}
}
