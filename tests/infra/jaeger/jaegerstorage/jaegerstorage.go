// Package jaegerstorage is meshgate's memory-only stand-in for Jaeger's jaeger_storage extension
// (cmd/jaeger/internal/extension/jaegerstorage of github.com/jaegertracing/jaeger v1.76.0), for
// the test build of tests/infra/jaeger/main.go. Upstream's package links every storage backend
// (Elasticsearch's typed API alone is some 850 packages, plus OpenSearch, Cassandra, ClickHouse,
// Badger, gRPC, Prometheus metrics) although the tests configure only `memory`; jaeger.sh
// replaces its files with this one in the build copy, so jaeger_query and
// jaeger_storage_exporter, which find their store through this package, still build unchanged.
// Same component type, same config keys (backends.<name>.memory.max_traces); any other backend
// or a metric backend is a config error, never silently ignored.
package jaegerstorage

import (
	"context"
	"errors"
	"fmt"
	"io"

	"go.opentelemetry.io/collector/component"
	"go.opentelemetry.io/collector/extension"

	"github.com/jaegertracing/jaeger/internal/metrics"
	storage "github.com/jaegertracing/jaeger/internal/storage/v1"
	v1memory "github.com/jaegertracing/jaeger/internal/storage/v1/memory"
	"github.com/jaegertracing/jaeger/internal/storage/v2/api/tracestore"
	"github.com/jaegertracing/jaeger/internal/storage/v2/memory"
	"github.com/jaegertracing/jaeger/internal/telemetry"
)

var componentType = component.MustNewType("jaeger_storage")

// ID is the identifier of this extension (jaeger_query depends on it).
var ID = component.NewID(componentType)

// Config: backends by name, each of which must say memory.
type Config struct {
	TraceBackends map[string]TraceBackend `mapstructure:"backends"`
}

// TraceBackend: only the in-memory store is built in.
type TraceBackend struct {
	Memory *v1memory.Configuration `mapstructure:"memory"`
}

// Validate rejects a backend without memory (an upstream-only backend, or a typo).
func (c *Config) Validate() error {
	if len(c.TraceBackends) == 0 {
		return errors.New("at least one storage backend is required")
	}
	for name, b := range c.TraceBackends {
		if b.Memory == nil {
			return fmt.Errorf("storage backend %q: this test build has only the memory backend", name)
		}
	}
	return nil
}

// Extension is what jaeger_query and jaeger_storage_exporter look the store up through.
type Extension interface {
	extension.Extension
	TraceStorageFactory(name string) (tracestore.Factory, bool)
}

type storageExt struct {
	config    *Config
	telset    component.TelemetrySettings
	factories map[string]tracestore.Factory
}

// NewFactory is the jaeger_storage extension's factory.
func NewFactory() extension.Factory {
	return extension.NewFactory(componentType,
		func() component.Config { return &Config{} },
		func(_ context.Context, set extension.Settings, cfg component.Config) (extension.Extension, error) {
			return &storageExt{config: cfg.(*Config), telset: set.TelemetrySettings,
				factories: map[string]tracestore.Factory{}}, nil
		},
		component.StabilityLevelBeta)
}

func (s *storageExt) Start(_ context.Context, host component.Host) error {
	telset := telemetry.FromOtelComponent(s.telset, host)
	ns := telset.Metrics.Namespace(metrics.NSOptions{Name: "jaeger"})
	for name, b := range s.config.TraceBackends {
		mt := telset
		mt.Metrics = ns.Namespace(metrics.NSOptions{Name: "storage",
			Tags: map[string]string{"name": name, "kind": "memory", "role": "tracestore"}})
		f, err := memory.NewFactory(*b.Memory, mt)
		if err != nil {
			return fmt.Errorf("failed to initialize storage '%s': %w", name, err)
		}
		s.factories[name] = f
	}
	return nil
}

func (s *storageExt) Shutdown(context.Context) error {
	var errs []error
	for _, f := range s.factories {
		if c, ok := f.(io.Closer); ok {
			errs = append(errs, c.Close())
		}
	}
	return errors.Join(errs...)
}

func (s *storageExt) TraceStorageFactory(name string) (tracestore.Factory, bool) {
	f, ok := s.factories[name]
	return f, ok
}

func findExtension(host component.Host) (Extension, error) {
	for id, comp := range host.GetExtensions() {
		if id.Type() != componentType {
			continue
		}
		if ext, ok := comp.(Extension); ok {
			return ext, nil
		}
		return nil, fmt.Errorf("extension '%s' is not of expected type '%s'", id, componentType)
	}
	return nil, fmt.Errorf("cannot find extension '%s' (make sure it's defined earlier in the config)",
		componentType)
}

// GetTraceStoreFactory: the named backend's trace store factory.
func GetTraceStoreFactory(name string, host component.Host) (tracestore.Factory, error) {
	ext, err := findExtension(host)
	if err != nil {
		return nil, err
	}
	f, ok := ext.TraceStorageFactory(name)
	if !ok {
		return nil, fmt.Errorf("cannot find definition of storage '%s' in the configuration for extension '%s'",
			name, componentType)
	}
	return f, nil
}

// GetMetricStorageFactory: this build has no metric backends (jaeger_query asks only when its
// storage.metrics is set).
func GetMetricStorageFactory(name string, _ component.Host) (storage.MetricStoreFactory, error) {
	return nil, fmt.Errorf("metric storage '%s': this test build has no metric backends", name)
}
