// Package deploy checks the meshgate Helm chart offline: it renders the chart with helm
// template, decodes every object strictly into its official type (Kubernetes objects into
// k8s.io/api structs with unknown fields rejected, Istio specs into istio.io/api messages with
// protojson, ServiceMonitor into a minimal strict struct), then checks the properties that
// matter for running meshgate in a mesh (checks.go).
package deploy

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"

	"google.golang.org/protobuf/encoding/protojson"
	"google.golang.org/protobuf/proto"
	netv1b1 "istio.io/api/networking/v1beta1"
	secv1b1 "istio.io/api/security/v1beta1"
	appsv1 "k8s.io/api/apps/v1"
	autoscalingv2 "k8s.io/api/autoscaling/v2"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	policyv1 "k8s.io/api/policy/v1"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	utilyaml "k8s.io/apimachinery/pkg/util/yaml"
	"sigs.k8s.io/yaml"
)

// KubeVersion is passed to helm template/lint: a `go install` build of Helm defaults to an old one.
const KubeVersion = "1.30.0"

// Object is one rendered manifest document, decoded into its official type.
type Object struct {
	APIVersion string
	Kind       string
	Meta       metav1.ObjectMeta
	// Typed is *appsv1.Deployment, *corev1.Service, ... for Kubernetes objects,
	// the istio.io/api spec message for Istio objects, *ServiceMonitor for the Prometheus Operator.
	Typed any
}

// Manifest is a rendered release.
type Manifest struct {
	Namespace string
	Objects   []Object
}

// ServiceMonitor is the subset of monitoring.coreos.com/v1 the chart uses; unknown fields fail.
type ServiceMonitor struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       struct {
		NamespaceSelector *struct {
			MatchNames []string `json:"matchNames"`
			Any        bool     `json:"any,omitempty"`
		} `json:"namespaceSelector,omitempty"`
		Selector  metav1.LabelSelector `json:"selector"`
		Endpoints []struct {
			Port          string `json:"port"`
			Path          string `json:"path"`
			Interval      string `json:"interval"`
			ScrapeTimeout string `json:"scrapeTimeout"`
			Scheme        string `json:"scheme"`
			TLSConfig     *struct {
				CAFile             string `json:"caFile"`
				CertFile           string `json:"certFile"`
				KeyFile            string `json:"keyFile"`
				InsecureSkipVerify bool   `json:"insecureSkipVerify"`
			} `json:"tlsConfig,omitempty"`
		} `json:"endpoints"`
	} `json:"spec"`
}

// PrometheusRule is the subset of monitoring.coreos.com/v1 the chart uses; unknown fields fail.
type PrometheusRule struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       RuleSpec          `json:"spec"`
}

// RuleSpec is a Prometheus rules file (groups of alerting rules).
type RuleSpec struct {
	Groups []struct {
		Name  string `json:"name"`
		Rules []struct {
			Alert       string            `json:"alert"`
			Expr        string            `json:"expr"`
			For         string            `json:"for,omitempty"`
			Labels      map[string]string `json:"labels,omitempty"`
			Annotations map[string]string `json:"annotations,omitempty"`
		} `json:"rules"`
	} `json:"groups"`
}

// istioEnvelope holds an Istio object; spec is decoded separately with protojson.
type istioEnvelope struct {
	APIVersion string            `json:"apiVersion"`
	Kind       string            `json:"kind"`
	Metadata   metav1.ObjectMeta `json:"metadata"`
	Spec       json.RawMessage   `json:"spec"`
}

var kubeTypes = map[string]func() any{
	"v1/ConfigMap":                            func() any { return &corev1.ConfigMap{} },
	"v1/Secret":                               func() any { return &corev1.Secret{} },
	"v1/Service":                              func() any { return &corev1.Service{} },
	"v1/ServiceAccount":                       func() any { return &corev1.ServiceAccount{} },
	"v1/Pod":                                  func() any { return &corev1.Pod{} },
	"apps/v1/Deployment":                      func() any { return &appsv1.Deployment{} },
	"autoscaling/v2/HorizontalPodAutoscaler":  func() any { return &autoscalingv2.HorizontalPodAutoscaler{} },
	"policy/v1/PodDisruptionBudget":           func() any { return &policyv1.PodDisruptionBudget{} },
	"networking.k8s.io/v1/NetworkPolicy":      func() any { return &networkingv1.NetworkPolicy{} },
	"monitoring.coreos.com/v1/ServiceMonitor": func() any { return &ServiceMonitor{} },
	"monitoring.coreos.com/v1/PrometheusRule": func() any { return &PrometheusRule{} },
}

var istioTypes = map[string]func() proto.Message{
	"security.istio.io/v1beta1/PeerAuthentication":  func() proto.Message { return &secv1b1.PeerAuthentication{} },
	"security.istio.io/v1beta1/AuthorizationPolicy": func() proto.Message { return &secv1b1.AuthorizationPolicy{} },
	"networking.istio.io/v1beta1/DestinationRule":   func() proto.Message { return &netv1b1.DestinationRule{} },
	"networking.istio.io/v1beta1/Gateway":           func() proto.Message { return &netv1b1.Gateway{} },
	"networking.istio.io/v1beta1/VirtualService":    func() proto.Message { return &netv1b1.VirtualService{} },
	"networking.istio.io/v1beta1/Sidecar":           func() proto.Message { return &netv1b1.Sidecar{} },
}

// decodeStrict decodes JSON into v, failing on unknown fields and trailing data.
func decodeStrict(data []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data after object")
	}
	return nil
}

// ParseDocument decodes one YAML document strictly. Duplicate keys, unknown fields and
// unsupported apiVersion/kind pairs (e.g. autoscaling/v1 HorizontalPodAutoscaler) are errors.
func ParseDocument(doc []byte) (*Object, error) {
	js, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return nil, fmt.Errorf("yaml: %w", err)
	}
	var head struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name string `json:"name"`
		} `json:"metadata"`
	}
	if err := json.Unmarshal(js, &head); err != nil {
		return nil, err
	}
	key := head.APIVersion + "/" + head.Kind
	where := fmt.Sprintf("%s %q", key, head.Metadata.Name)
	if mk, ok := kubeTypes[key]; ok {
		v := mk()
		if err := decodeStrict(js, v); err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		o := &Object{APIVersion: head.APIVersion, Kind: head.Kind, Typed: v}
		if sm, ok := v.(*ServiceMonitor); ok {
			o.Meta = sm.Metadata
		} else if pr, ok := v.(*PrometheusRule); ok {
			o.Meta = pr.Metadata
		} else if mo, ok := v.(interface{ GetObjectMeta() metav1.Object }); ok {
			m := mo.GetObjectMeta()
			o.Meta = metav1.ObjectMeta{Name: m.GetName(), Namespace: m.GetNamespace(),
				Labels: m.GetLabels(), Annotations: m.GetAnnotations()}
		}
		return o, nil
	}
	if mk, ok := istioTypes[key]; ok {
		var env istioEnvelope
		if err := decodeStrict(js, &env); err != nil {
			return nil, fmt.Errorf("%s: %w", where, err)
		}
		spec := mk()
		if len(env.Spec) == 0 {
			return nil, fmt.Errorf("%s: no spec", where)
		}
		if err := (protojson.UnmarshalOptions{DiscardUnknown: false}).Unmarshal(env.Spec, spec); err != nil {
			return nil, fmt.Errorf("%s: spec: %w", where, err)
		}
		return &Object{APIVersion: env.APIVersion, Kind: env.Kind, Meta: env.Metadata, Typed: spec}, nil
	}
	return nil, fmt.Errorf("%s: apiVersion/kind not supported by this chart's checks", where)
}

// Parse splits a multi-document YAML stream and decodes each document strictly.
func Parse(namespace string, stream []byte) (*Manifest, error) {
	m := &Manifest{Namespace: namespace}
	r := utilyaml.NewYAMLReader(bufio.NewReader(bytes.NewReader(stream)))
	for {
		doc, err := r.Read()
		if err == io.EOF {
			break
		}
		if err != nil {
			return nil, err
		}
		if len(bytes.TrimSpace(stripComments(doc))) == 0 {
			continue
		}
		o, err := ParseDocument(doc)
		if err != nil {
			return nil, err
		}
		m.Objects = append(m.Objects, *o)
	}
	return m, nil
}

func stripComments(doc []byte) []byte {
	var out []byte
	for _, line := range bytes.Split(doc, []byte("\n")) {
		if t := bytes.TrimSpace(line); len(t) > 0 && t[0] != '#' {
			out = append(out, line...)
			out = append(out, '\n')
		}
	}
	return out
}

// All returns the typed objects of type T.
func All[T any](m *Manifest) []T {
	var out []T
	for _, o := range m.Objects {
		if v, ok := o.Typed.(T); ok {
			out = append(out, v)
		}
	}
	return out
}

// Find returns the object of the given kind and name, or nil.
func (m *Manifest) Find(kind, name string) *Object {
	for i := range m.Objects {
		if m.Objects[i].Kind == kind && m.Objects[i].Meta.Name == name {
			return &m.Objects[i]
		}
	}
	return nil
}

// Remove drops every object of the given kind for which drop returns true.
func (m *Manifest) Remove(kind string, drop func(*Object) bool) {
	out := m.Objects[:0]
	for i := range m.Objects {
		if m.Objects[i].Kind == kind && drop(&m.Objects[i]) {
			continue
		}
		out = append(out, m.Objects[i])
	}
	m.Objects = out
}

// Helm runs helm and returns stdout; stderr is folded into the error.
func Helm(args ...string) ([]byte, error) {
	bin := os.Getenv("HELM")
	if bin == "" {
		cache := os.Getenv("MESHGATE_CACHE")
		if cache == "" {
			home, _ := os.UserHomeDir()
			cache = filepath.Join(home, ".cache", "meshgate")
		}
		bin = filepath.Join(cache, "bin", "helm")
	}
	cmd := exec.Command(bin, args...)
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return stdout.Bytes(), fmt.Errorf("helm %s: %v: %s", strings.Join(args, " "), err, stderr.String())
	}
	return stdout.Bytes(), nil
}

// ChartDir is the chart, relative to this package.
const ChartDir = "../../helm/meshgate"

// Template renders the chart into namespace ns with the given values files and --set pairs.
func Template(ns string, valuesFiles []string, sets ...string) ([]byte, error) {
	args := []string{"template", "meshgate", ChartDir, "--namespace", ns, "--kube-version", KubeVersion, "--include-crds"}
	for _, f := range valuesFiles {
		args = append(args, "--values", f)
	}
	for _, s := range sets {
		args = append(args, "--set", s)
	}
	return Helm(args...)
}
