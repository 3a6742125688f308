package deploy

import (
	"errors"
	"fmt"
	"os"
	"regexp"
	"strconv"
	"strings"
	"sync"

	netv1b1 "istio.io/api/networking/v1beta1"
	secv1b1 "istio.io/api/security/v1beta1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	policyv1 "k8s.io/api/policy/v1"
	"k8s.io/apimachinery/pkg/labels"
)

// Container, ports and names the gateway is known by.
const (
	ContainerName     = "meshgate"
	MessagingService  = "meshgate.v1.Messaging"
	ConnectionsMetric = "meshgate_ws_connections"
	PeerPaths         = "/meshgate.v1.GatewayPeer/*"
	MessagingPaths    = "/meshgate.v1.Messaging/*"
)

// Check is one property of a rendered release.
type Check struct {
	Name string
	Fn   func(*Manifest) error
}

// Checks every rendering must pass.
var Checks = []Check{
	{"deployment", CheckDeployment},
	{"service-ports", CheckServicePorts},
	{"headless-peer-service", CheckHeadlessPeer},
	{"grpc-probes", CheckProbes},
	{"drain-lifecycle", CheckLifecycle},
	{"security-context", CheckSecurity},
	{"gateway-env", CheckEnv},
	{"peer-authority", CheckPeerAuthority},
	{"hpa", CheckHPA},
	{"pdb", CheckPDB},
	{"istio", CheckIstio},
	{"service-monitor", CheckServiceMonitor},
	{"helm-test", CheckTestHook},
}

// RunChecks runs all checks and joins their errors.
func RunChecks(m *Manifest) error {
	var errs []error
	for _, c := range Checks {
		if err := c.Fn(m); err != nil {
			errs = append(errs, fmt.Errorf("%s: %w", c.Name, err))
		}
	}
	return errors.Join(errs...)
}

func deployment(m *Manifest) (*appsv1.Deployment, error) {
	ds := All[*appsv1.Deployment](m)
	if len(ds) != 1 {
		return nil, fmt.Errorf("want exactly 1 Deployment, got %d", len(ds))
	}
	return ds[0], nil
}

func gatewayContainer(d *appsv1.Deployment) (*corev1.Container, error) {
	for i := range d.Spec.Template.Spec.Containers {
		if d.Spec.Template.Spec.Containers[i].Name == ContainerName {
			return &d.Spec.Template.Spec.Containers[i], nil
		}
	}
	return nil, fmt.Errorf("Deployment %s has no container %q", d.Name, ContainerName)
}

func containerPort(c *corev1.Container, name string) (int32, error) {
	for _, p := range c.Ports {
		if p.Name == name {
			return p.ContainerPort, nil
		}
	}
	return 0, fmt.Errorf("container %s has no port named %q", c.Name, name)
}

// CheckDeployment: one Deployment whose selector matches its pod template.
func CheckDeployment(m *Manifest) error {
	d, err := deployment(m)
	if err != nil {
		return err
	}
	if d.Spec.Selector == nil || len(d.Spec.Selector.MatchLabels) == 0 {
		return errors.New("Deployment has no selector")
	}
	if !labels.SelectorFromSet(d.Spec.Selector.MatchLabels).Matches(labels.Set(d.Spec.Template.Labels)) {
		return errors.New("Deployment selector does not match its pod template labels")
	}
	_, err = gatewayContainer(d)
	return err
}

// istioPrefix reports whether a Service port name tells Istio the protocol proto
// (name "<proto>" or "<proto>-suffix").
func istioPrefix(name, proto string) bool {
	return name == proto || strings.HasPrefix(name, proto+"-")
}

// CheckServicePorts: every Service port declares its protocol by name prefix and appProtocol,
// consistently, so Istio never sniffs. The gRPC port is grpc/grpc, WebSocket is http/http.
func CheckServicePorts(m *Manifest) error {
	d, err := deployment(m)
	if err != nil {
		return err
	}
	c, err := gatewayContainer(d)
	if err != nil {
		return err
	}
	grpcPort, err := containerPort(c, "grpc")
	if err != nil {
		return err
	}
	var errs []error
	svcs := All[*corev1.Service](m)
	if len(svcs) == 0 {
		return errors.New("no Service")
	}
	for _, s := range svcs {
		for _, p := range s.Spec.Ports {
			where := fmt.Sprintf("Service %s port %d (%q)", s.Name, p.Port, p.Name)
			if p.AppProtocol == nil || *p.AppProtocol == "" {
				errs = append(errs, fmt.Errorf("%s: no appProtocol, Istio would sniff", where))
				continue
			}
			ap := *p.AppProtocol
			if !istioPrefix(p.Name, ap) {
				errs = append(errs, fmt.Errorf("%s: name does not start with its appProtocol %q", where, ap))
			}
			isGRPC := p.Port == grpcPort || p.TargetPort.String() == "grpc" || p.TargetPort.IntValue() == int(grpcPort)
			if isGRPC && (ap != "grpc" || !istioPrefix(p.Name, "grpc")) {
				errs = append(errs, fmt.Errorf("%s: the gRPC port must be named grpc[-*] with appProtocol grpc", where))
			}
			if !isGRPC && (ap != "http" || !istioPrefix(p.Name, "http")) {
				errs = append(errs, fmt.Errorf("%s: the WebSocket port must be named http[-*] with appProtocol http (HTTP/1.1 upgrade)", where))
			}
		}
	}
	return errors.Join(errs...)
}

func peerService(m *Manifest) (*corev1.Service, error) {
	d, err := deployment(m)
	if err != nil {
		return nil, err
	}
	podLabels := labels.Set(d.Spec.Template.Labels)
	var found *corev1.Service
	for _, s := range All[*corev1.Service](m) {
		if s.Spec.ClusterIP != corev1.ClusterIPNone {
			continue
		}
		if len(s.Spec.Selector) == 0 || !labels.SelectorFromSet(s.Spec.Selector).Matches(podLabels) {
			continue
		}
		if found != nil {
			return nil, fmt.Errorf("two headless Services select the gateways: %s, %s", found.Name, s.Name)
		}
		found = s
	}
	if found == nil {
		return nil, errors.New("no headless (clusterIP: None) Service selects the gateway pods")
	}
	return found, nil
}

// CheckHeadlessPeer: a headless Service selects the gateways and declares the gRPC port.
func CheckHeadlessPeer(m *Manifest) error {
	s, err := peerService(m)
	if err != nil {
		return err
	}
	d, _ := deployment(m)
	c, err := gatewayContainer(d)
	if err != nil {
		return err
	}
	grpcPort, err := containerPort(c, "grpc")
	if err != nil {
		return err
	}
	for _, p := range s.Spec.Ports {
		if p.Port == grpcPort && p.AppProtocol != nil && *p.AppProtocol == "grpc" && istioPrefix(p.Name, "grpc") {
			return nil
		}
	}
	return fmt.Errorf("headless Service %s declares no gRPC port %d (name grpc, appProtocol grpc)", s.Name, grpcPort)
}

// CheckProbes: startup, liveness and readiness are native gRPC probes on the gRPC port.
func CheckProbes(m *Manifest) error {
	d, err := deployment(m)
	if err != nil {
		return err
	}
	c, err := gatewayContainer(d)
	if err != nil {
		return err
	}
	grpcPort, err := containerPort(c, "grpc")
	if err != nil {
		return err
	}
	var errs []error
	for name, p := range map[string]*corev1.Probe{"startupProbe": c.StartupProbe, "livenessProbe": c.LivenessProbe, "readinessProbe": c.ReadinessProbe} {
		switch {
		case p == nil:
			errs = append(errs, fmt.Errorf("%s missing", name))
		case p.GRPC == nil || p.HTTPGet != nil || p.TCPSocket != nil || p.Exec != nil:
			errs = append(errs, fmt.Errorf("%s is not a gRPC health probe", name))
		case p.GRPC.Port != grpcPort:
			errs = append(errs, fmt.Errorf("%s on port %d, gRPC is %d", name, p.GRPC.Port, grpcPort))
		}
	}
	if p := c.ReadinessProbe; p != nil && p.GRPC != nil && p.GRPC.Service != nil &&
		*p.GRPC.Service != "" && *p.GRPC.Service != MessagingService {
		errs = append(errs, fmt.Errorf("readinessProbe checks unknown service %q", *p.GRPC.Service))
	}
	return errors.Join(errs...)
}

// env resolves the container's environment: envFrom ConfigMaps first, then env entries.
// Values from the downward API read as "fieldRef:<path>", from Secrets "secret:<name>/<key>".
func env(m *Manifest, c *corev1.Container) (map[string]string, error) {
	out := map[string]string{}
	for _, ef := range c.EnvFrom {
		if ef.ConfigMapRef == nil {
			continue
		}
		o := m.Find("ConfigMap", ef.ConfigMapRef.Name)
		if o == nil {
			return nil, fmt.Errorf("envFrom ConfigMap %s not rendered", ef.ConfigMapRef.Name)
		}
		for k, v := range o.Typed.(*corev1.ConfigMap).Data {
			out[ef.Prefix+k] = v
		}
	}
	for _, e := range c.Env {
		switch {
		case e.ValueFrom == nil:
			out[e.Name] = e.Value
		case e.ValueFrom.FieldRef != nil:
			out[e.Name] = "fieldRef:" + e.ValueFrom.FieldRef.FieldPath
		case e.ValueFrom.SecretKeyRef != nil:
			out[e.Name] = "secret:" + e.ValueFrom.SecretKeyRef.Name + "/" + e.ValueFrom.SecretKeyRef.Key
		}
	}
	return out, nil
}

// expand resolves one level of $(VAR) the way the kubelet does.
func expand(v string, vars map[string]string) string {
	if strings.HasPrefix(v, "$(") && strings.HasSuffix(v, ")") {
		if r, ok := vars[v[2:len(v)-1]]; ok {
			return r
		}
	}
	return v
}

// CheckEnv: listeners on all interfaces, identity and address from the downward API,
// region set, JWT configured.
func CheckEnv(m *Manifest) error {
	d, err := deployment(m)
	if err != nil {
		return err
	}
	c, err := gatewayContainer(d)
	if err != nil {
		return err
	}
	e, err := env(m, c)
	if err != nil {
		return err
	}
	known, err := GatewayEnvNames()
	if err != nil {
		return err
	}
	var errs []error
	for k := range e {
		if (strings.HasPrefix(k, "MESHGATE_") || strings.HasPrefix(k, "CONSUL_")) && !known[k] {
			errs = append(errs, fmt.Errorf("%s is not an environment variable the gateway reads (src/gateway/config.h)", k))
		}
	}
	want := func(k, v string) {
		if got := expand(e[k], e); got != v {
			errs = append(errs, fmt.Errorf("%s = %q, want %q", k, got, v))
		}
	}
	ws, _ := containerPort(c, "http-ws")
	gp, _ := containerPort(c, "grpc")
	want("MESHGATE_WS_LISTEN", fmt.Sprintf("0.0.0.0:%d", ws))
	want("MESHGATE_GRPC_LISTEN", fmt.Sprintf("0.0.0.0:%d", gp))
	want("MESHGATE_ADVERTISE_ADDR", "fieldRef:status.podIP")
	want("MESHGATE_ID", "fieldRef:metadata.name")
	want("POD_NAMESPACE", "fieldRef:metadata.namespace")
	want("POD_IP", "fieldRef:status.podIP")
	if e["MESHGATE_REGION"] == "" {
		errs = append(errs, errors.New("MESHGATE_REGION not set"))
	}
	if e["MESHGATE_JWT_SECRET"] == "" && e["MESHGATE_JWT_PUBLIC_KEY_FILE"] == "" {
		errs = append(errs, errors.New("neither MESHGATE_JWT_SECRET nor MESHGATE_JWT_PUBLIC_KEY_FILE set"))
	}
	if v := e["MESHGATE_JWT_SECRET"]; v != "" && !strings.HasPrefix(v, "secret:") {
		errs = append(errs, errors.New("MESHGATE_JWT_SECRET must come from a Secret"))
	}
	for k, v := range e {
		if strings.HasPrefix(k, "MESHGATE_") && strings.Contains(k, "PASSWORD") || k == "CONSUL_HTTP_TOKEN" {
			if !strings.HasPrefix(v, "secret:") {
				errs = append(errs, fmt.Errorf("%s must come from a Secret", k))
			}
		}
	}
	if e["MESHGATE_DISCOVERY"] == "consul" && e["CONSUL_HTTP_ADDR"] == "" {
		errs = append(errs, errors.New("discovery consul without a Consul address"))
	}
	return errors.Join(errs...)
}

// CheckPeerAuthority: MESHGATE_PEER_AUTHORITY is <headless-svc>.<ns>.svc.cluster.local:<grpc port>.
func CheckPeerAuthority(m *Manifest) error {
	d, err := deployment(m)
	if err != nil {
		return err
	}
	c, err := gatewayContainer(d)
	if err != nil {
		return err
	}
	e, err := env(m, c)
	if err != nil {
		return err
	}
	s, err := peerService(m)
	if err != nil {
		return err
	}
	gp, err := containerPort(c, "grpc")
	if err != nil {
		return err
	}
	want := fmt.Sprintf("%s.%s.svc.cluster.local:%d", s.Name, m.Namespace, gp)
	got, ok := e["MESHGATE_PEER_AUTHORITY"]
	if !ok {
		return fmt.Errorf("MESHGATE_PEER_AUTHORITY not set (want %q): pod-IP peer calls would bypass mTLS", want)
	}
	if got != want {
		return fmt.Errorf("MESHGATE_PEER_AUTHORITY = %q, want %q", got, want)
	}
	return nil
}

func drainSeconds(m *Manifest, c *corev1.Container) (int, error) {
	e, err := env(m, c)
	if err != nil {
		return 0, err
	}
	v, ok := e["MESHGATE_DRAIN_SECONDS"]
	if !ok {
		return 10, nil // the gateway's default
	}
	return strconv.Atoi(v)
}

// CheckLifecycle: preStop sleep, and a grace period covering preStop + drain window.
func CheckLifecycle(m *Manifest) error {
	d, err := deployment(m)
	if err != nil {
		return err
	}
	c, err := gatewayContainer(d)
	if err != nil {
		return err
	}
	drain, err := drainSeconds(m, c)
	if err != nil {
		return err
	}
	pre := 0
	if c.Lifecycle == nil || c.Lifecycle.PreStop == nil {
		return errors.New("no preStop hook: new connections keep arriving after SIGTERM")
	}
	if ps := c.Lifecycle.PreStop; ps.Exec != nil && len(ps.Exec.Command) == 2 && strings.HasSuffix(ps.Exec.Command[0], "sleep") {
		pre, _ = strconv.Atoi(ps.Exec.Command[1])
	} else if ps.Sleep != nil {
		pre = int(ps.Sleep.Seconds)
	}
	g := d.Spec.Template.Spec.TerminationGracePeriodSeconds
	if g == nil {
		return errors.New("terminationGracePeriodSeconds unset (30 s default is not derived from the drain window)")
	}
	if int(*g) <= pre+drain {
		return fmt.Errorf("terminationGracePeriodSeconds %d must exceed preStop %d + drain %d", *g, pre, drain)
	}
	return nil
}

// CheckSecurity: non-root, read-only root, no capabilities, resources, spread, config checksum.
func CheckSecurity(m *Manifest) error {
	d, err := deployment(m)
	if err != nil {
		return err
	}
	c, err := gatewayContainer(d)
	if err != nil {
		return err
	}
	var errs []error
	ps, sc := d.Spec.Template.Spec.SecurityContext, c.SecurityContext
	nonRoot := (sc != nil && sc.RunAsNonRoot != nil && *sc.RunAsNonRoot) || (ps != nil && ps.RunAsNonRoot != nil && *ps.RunAsNonRoot)
	if !nonRoot {
		errs = append(errs, errors.New("runAsNonRoot not true"))
	}
	if sc == nil {
		return errors.New("container has no securityContext")
	}
	if sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem {
		errs = append(errs, errors.New("readOnlyRootFilesystem not true"))
	}
	if sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation {
		errs = append(errs, errors.New("allowPrivilegeEscalation not false"))
	}
	dropAll := false
	if sc.Capabilities != nil {
		for _, cp := range sc.Capabilities.Drop {
			dropAll = dropAll || cp == "ALL"
		}
		if len(sc.Capabilities.Add) > 0 {
			errs = append(errs, fmt.Errorf("capabilities added: %v", sc.Capabilities.Add))
		}
	}
	if !dropAll {
		errs = append(errs, errors.New("capabilities do not drop ALL"))
	}
	if c.Resources.Requests.Cpu().IsZero() || c.Resources.Requests.Memory().IsZero() {
		errs = append(errs, errors.New("cpu and memory requests required (HPA utilization is relative to the cpu request)"))
	}
	if len(d.Spec.Template.Spec.TopologySpreadConstraints) == 0 {
		errs = append(errs, errors.New("no topologySpreadConstraints"))
	}
	if d.Spec.Template.Annotations["checksum/config"] == "" {
		errs = append(errs, errors.New("no checksum/config pod annotation: config changes would not roll the pods"))
	}
	return errors.Join(errs...)
}

// CheckHPA: if present, autoscaling/v2 on the Deployment, CPU as ContainerResource of the
// gateway container, connections as a Pods metric, slow scale-down; Deployment leaves replicas alone.
func CheckHPA(m *Manifest) error {
	var errs []error
	for _, o := range m.Objects {
		if o.Kind == "HorizontalPodAutoscaler" && o.APIVersion != "autoscaling/v2" {
			errs = append(errs, fmt.Errorf("HPA %s is %s, want autoscaling/v2", o.Meta.Name, o.APIVersion))
		}
	}
	hpas := All[*autoscalingv2.HorizontalPodAutoscaler](m)
	if len(hpas) == 0 {
		return errors.Join(errs...)
	}
	d, err := deployment(m)
	if err != nil {
		return err
	}
	if d.Spec.Replicas != nil {
		errs = append(errs, errors.New("Deployment sets replicas although an HPA owns them"))
	}
	for _, h := range hpas {
		if h.Spec.ScaleTargetRef.Kind != "Deployment" || h.Spec.ScaleTargetRef.Name != d.Name {
			errs = append(errs, fmt.Errorf("HPA %s targets %s/%s", h.Name, h.Spec.ScaleTargetRef.Kind, h.Spec.ScaleTargetRef.Name))
		}
		cpu := false
		for _, mt := range h.Spec.Metrics {
			switch mt.Type {
			case autoscalingv2.ResourceMetricSourceType:
				if mt.Resource != nil && mt.Resource.Name == corev1.ResourceCPU {
					errs = append(errs, errors.New("CPU metric is type Resource (pod total, skewed by the sidecar); want ContainerResource"))
				}
			case autoscalingv2.ContainerResourceMetricSourceType:
				r := mt.ContainerResource
				if r != nil && r.Name == corev1.ResourceCPU {
					if r.Container != ContainerName {
						errs = append(errs, fmt.Errorf("CPU metric on container %q, want %q", r.Container, ContainerName))
					}
					cpu = true
				}
			case autoscalingv2.PodsMetricSourceType:
				if mt.Pods == nil || mt.Pods.Metric.Name != ConnectionsMetric || mt.Pods.Target.Type != autoscalingv2.AverageValueMetricType {
					errs = append(errs, fmt.Errorf("Pods metric must be %s with an AverageValue target", ConnectionsMetric))
				}
			}
		}
		if !cpu {
			errs = append(errs, errors.New("no ContainerResource cpu metric"))
		}
		b := h.Spec.Behavior
		if b == nil || b.ScaleDown == nil || b.ScaleDown.StabilizationWindowSeconds == nil || *b.ScaleDown.StabilizationWindowSeconds < 300 {
			errs = append(errs, errors.New("scale-down must be slow: behavior.scaleDown.stabilizationWindowSeconds >= 300"))
		}
	}
	return errors.Join(errs...)
}

// HasConnectionsMetric reports whether an HPA scales on meshgate_ws_connections.
func HasConnectionsMetric(m *Manifest) bool {
	for _, h := range All[*autoscalingv2.HorizontalPodAutoscaler](m) {
		for _, mt := range h.Spec.Metrics {
			if mt.Pods != nil && mt.Pods.Metric.Name == ConnectionsMetric {
				return true
			}
		}
	}
	return false
}

// CheckPDB: more than one replica (or an HPA) needs a PodDisruptionBudget selecting the gateways.
func CheckPDB(m *Manifest) error {
	d, err := deployment(m)
	if err != nil {
		return err
	}
	multi := len(All[*autoscalingv2.HorizontalPodAutoscaler](m)) > 0 || d.Spec.Replicas == nil || *d.Spec.Replicas > 1
	pdbs := All[*policyv1.PodDisruptionBudget](m)
	if !multi {
		return nil
	}
	for _, p := range pdbs {
		if p.Spec.Selector != nil && labels.SelectorFromSet(p.Spec.Selector.MatchLabels).Matches(labels.Set(d.Spec.Template.Labels)) {
			return nil
		}
	}
	return errors.New("several gateways but no PodDisruptionBudget selecting them")
}

// CheckIstio: if any Istio object is rendered, the full set is there and says what it must.
func CheckIstio(m *Manifest) error {
	pas := All[*secv1b1.PeerAuthentication](m)
	aps := All[*secv1b1.AuthorizationPolicy](m)
	drs := All[*netv1b1.DestinationRule](m)
	vss := All[*netv1b1.VirtualService](m)
	gws := All[*netv1b1.Gateway](m)
	scs := All[*netv1b1.Sidecar](m)
	if len(pas)+len(aps)+len(drs)+len(vss)+len(gws)+len(scs) == 0 {
		return nil
	}
	d, err := deployment(m)
	if err != nil {
		return err
	}
	podLabels := labels.Set(d.Spec.Template.Labels)
	selects := func(ml map[string]string) bool {
		return len(ml) > 0 && labels.SelectorFromSet(ml).Matches(podLabels)
	}
	var errs []error
	strict := false
	for _, pa := range pas {
		if pa.GetSelector() != nil && selects(pa.GetSelector().GetMatchLabels()) && pa.GetMtls().GetMode() == secv1b1.PeerAuthentication_MutualTLS_STRICT {
			strict = true
		}
		for port, pm := range pa.GetPortLevelMtls() {
			if pm.GetMode() != secv1b1.PeerAuthentication_MutualTLS_STRICT {
				errs = append(errs, fmt.Errorf("PeerAuthentication relaxes port %d", port))
			}
		}
	}
	if !strict {
		errs = append(errs, errors.New("no STRICT PeerAuthentication selecting the gateways"))
	}

	sa := d.Spec.Template.Spec.ServiceAccountName
	self := fmt.Sprintf("/ns/%s/sa/%s", m.Namespace, sa)
	denyAll, peerAllowed := false, false
	for _, ap := range aps {
		if ap.GetSelector() == nil || !selects(ap.GetSelector().GetMatchLabels()) {
			errs = append(errs, errors.New("AuthorizationPolicy without a selector for the gateways"))
			continue
		}
		if ap.GetAction() != secv1b1.AuthorizationPolicy_ALLOW {
			continue
		}
		if len(ap.GetRules()) == 0 && ap.GetProvider() == nil {
			denyAll = true
		}
		for _, r := range ap.GetRules() {
			if len(r.GetFrom()) == 0 {
				errs = append(errs, errors.New("an ALLOW rule has no from: it admits any source"))
			}
			if len(r.GetTo()) == 0 {
				errs = append(errs, errors.New("an ALLOW rule has no to: it admits every path"))
			}
			peer := false
			for _, t := range r.GetTo() {
				for _, p := range t.GetOperation().GetPaths() {
					if p == PeerPaths || p == "/*" || p == "*" || strings.HasPrefix(PeerPaths, strings.TrimSuffix(p, "*")) && strings.HasSuffix(p, "*") {
						peer = true
					}
				}
			}
			if !peer {
				continue
			}
			for _, f := range r.GetFrom() {
				s := f.GetSource()
				if len(s.GetNamespaces()) > 0 || len(s.GetRequestPrincipals()) > 0 || len(s.GetIpBlocks()) > 0 || len(s.GetRemoteIpBlocks()) > 0 {
					errs = append(errs, errors.New("GatewayPeer is reachable by something other than principals"))
				}
				for _, p := range s.GetPrincipals() {
					if !strings.HasSuffix(p, self) || strings.Contains(p, "*") {
						errs = append(errs, fmt.Errorf("GatewayPeer allowed from %q, only the gateways' own service account (%s) may call it", p, self))
					} else {
						peerAllowed = true
					}
				}
			}
		}
	}
	if !denyAll {
		errs = append(errs, errors.New("no default-deny (rule-less ALLOW) AuthorizationPolicy for the gateways"))
	}
	if !peerAllowed {
		errs = append(errs, errors.New("GatewayPeer not allowed from the gateways' service account: peer delivery would be denied"))
	}

	if len(drs) == 0 {
		errs = append(errs, errors.New("no DestinationRule"))
	}
	for _, dr := range drs {
		tp := dr.GetTrafficPolicy()
		if tp.GetConnectionPool() == nil {
			errs = append(errs, fmt.Errorf("DestinationRule %s: no connectionPool", dr.GetHost()))
		}
		if tp.GetConnectionPool().GetHttp().GetIdleTimeout() != nil && tp.GetConnectionPool().GetHttp().GetIdleTimeout().AsDuration().Hours() < 1 {
			errs = append(errs, fmt.Errorf("DestinationRule %s: idleTimeout under 1h cuts idle WebSockets", dr.GetHost()))
		}
	}
	outlier := false
	for _, dr := range drs {
		outlier = outlier || dr.GetTrafficPolicy().GetOutlierDetection() != nil
	}
	if len(drs) > 0 && !outlier {
		errs = append(errs, errors.New("no DestinationRule with outlierDetection"))
	}
	for _, vs := range vss {
		for _, h := range vs.GetHttp() {
			if h.GetTimeout() == nil || h.GetTimeout().AsDuration() != 0 {
				errs = append(errs, fmt.Errorf("VirtualService route %q: timeout must be 0s, a route timeout cuts long-lived WebSockets", h.GetName()))
			}
		}
	}
	if len(vss) > 0 && len(gws) == 0 {
		errs = append(errs, errors.New("VirtualService without a Gateway"))
	}
	if len(scs) == 0 {
		errs = append(errs, errors.New("no Sidecar scope"))
	}
	return errors.Join(errs...)
}

// CheckServiceMonitor: if present, it selects the client Service and scrapes a port it has.
func CheckServiceMonitor(m *Manifest) error {
	var errs []error
	for _, sm := range All[*ServiceMonitor](m) {
		if len(sm.Spec.Endpoints) == 0 {
			errs = append(errs, fmt.Errorf("ServiceMonitor %s has no endpoints", sm.Metadata.Name))
		}
		if len(sm.Spec.Selector.MatchLabels) == 0 {
			errs = append(errs, fmt.Errorf("ServiceMonitor %s has no selector", sm.Metadata.Name))
			continue
		}
		sel := labels.SelectorFromSet(sm.Spec.Selector.MatchLabels)
		var matched []*corev1.Service
		for _, s := range All[*corev1.Service](m) {
			if sel.Matches(labels.Set(s.Labels)) {
				matched = append(matched, s)
			}
		}
		if len(matched) != 1 {
			errs = append(errs, fmt.Errorf("ServiceMonitor %s selects %d Services, want 1 (the peer Service would double the series)", sm.Metadata.Name, len(matched)))
			continue
		}
		for _, ep := range sm.Spec.Endpoints {
			ok := false
			for _, p := range matched[0].Spec.Ports {
				ok = ok || p.Name == ep.Port
			}
			if !ok {
				errs = append(errs, fmt.Errorf("ServiceMonitor port %q not on Service %s", ep.Port, matched[0].Name))
			}
			if ep.Path != "/metrics" {
				errs = append(errs, fmt.Errorf("ServiceMonitor path %q, the gateway serves /metrics", ep.Path))
			}
		}
	}
	return errors.Join(errs...)
}

// CheckTestHook: a helm test pod runs meshgate-cli health and is not a gateway by its labels.
func CheckTestHook(m *Manifest) error {
	d, err := deployment(m)
	if err != nil {
		return err
	}
	for _, p := range All[*corev1.Pod](m) {
		if p.Annotations["helm.sh/hook"] != "test" {
			continue
		}
		if labels.SelectorFromSet(d.Spec.Selector.MatchLabels).Matches(labels.Set(p.Labels)) {
			return fmt.Errorf("test pod %s carries the gateway selector labels: Services would route to it", p.Name)
		}
		for _, c := range p.Spec.Containers {
			cmd := strings.Join(append(append([]string{}, c.Command...), c.Args...), " ")
			if strings.Contains(cmd, "meshgate-cli health") && strings.Contains(cmd, "--addr") {
				return nil
			}
		}
		return fmt.Errorf("test pod %s does not run meshgate-cli health --addr", p.Name)
	}
	return errors.New("no helm test pod")
}

var (
	envOnce  sync.Once
	envNames map[string]bool
	envErr   error
)

// GatewayEnvNames reads the environment variables of the gateway's one
// configuration table, so the chart can only set variables the binary reads.
func GatewayEnvNames() (map[string]bool, error) {
	envOnce.Do(func() {
		src, err := os.ReadFile("../../src/gateway/config.h")
		if err != nil {
			envErr = fmt.Errorf("reading the configuration table: %w", err)
			return
		}
		re := regexp.MustCompile(`X\(\s*(?:STR|INT|BOOL|RATIO),\s*\w+,\s*"[^"]+",\s*"([A-Z0-9_]+)"`)
		envNames = map[string]bool{}
		for _, m := range re.FindAllSubmatch(src, -1) {
			envNames[string(m[1])] = true
		}
		if len(envNames) < 10 {
			envErr = fmt.Errorf("found only %d options in config.h", len(envNames))
		}
	})
	return envNames, envErr
}
