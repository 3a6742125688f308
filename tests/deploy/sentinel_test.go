package deploy

// gateway.presence=redis-sentinel: the ConfigMap carries the Sentinels and the master name the
// gateway reads (--sentinel-nodes, --sentinel-master), and the usual checks hold.

import (
	"testing"

	corev1 "k8s.io/api/core/v1"
)

func TestSentinelPresence(t *testing.T) {
	m := render(t, "values/production.yaml", "gateway.presence=redis-sentinel",
		"redis.sentinel.nodes={sentinel-0.data:26379,sentinel-1.data:26379}", "redis.sentinel.master=meshgate")
	if err := RunChecks(m); err != nil {
		t.Fatal(err)
	}
	var data map[string]string
	for _, o := range m.Objects {
		if cm, ok := o.Typed.(*corev1.ConfigMap); ok && cm.Data["MESHGATE_PRESENCE"] != "" {
			data = cm.Data
		}
	}
	want := map[string]string{
		"MESHGATE_PRESENCE":        "redis-sentinel",
		"MESHGATE_SENTINEL_NODES":  "sentinel-0.data:26379,sentinel-1.data:26379",
		"MESHGATE_SENTINEL_MASTER": "meshgate",
	}
	for k, v := range want {
		if data[k] != v {
			t.Errorf("%s = %q, want %q", k, data[k], v)
		}
	}
	// redis-cluster (the default) sets no Sentinel variables.
	for _, o := range render(t, "values/production.yaml").Objects {
		if cm, ok := o.Typed.(*corev1.ConfigMap); ok {
			if _, set := cm.Data["MESHGATE_SENTINEL_NODES"]; set {
				t.Errorf("ConfigMap %s sets MESHGATE_SENTINEL_NODES with presence redis-cluster", cm.Name)
			}
		}
	}
}
