// Package storage stands in, for tests/infra/jaeger.sh's build only, for the one name
// cmd/query/app (jaeger_query's options) takes from Jaeger's v1 storage factory package:
// ArchiveStorage, in the signature of BuildQueryServiceOptions, which only the v1 binaries call.
// Importing the real package links every v1 backend (Elasticsearch, Cassandra, Badger, Kafka,
// gRPC); jaeger.sh points that one import here in the build copy.
package storage

import "github.com/jaegertracing/jaeger/internal/storage/v1/api/spanstore"

// ArchiveStorage has the fields of upstream's internal/storage/v1/factory.ArchiveStorage.
type ArchiveStorage struct {
	Reader spanstore.Reader
	Writer spanstore.Writer
}
