# The two commands of the README, plus the ones developers use daily.
#   make run    build and start one gateway on the embedded default
#   make test   install what the tests need, start the real services, build
#               (normal and ASan+UBSan), run every test, stop the services
#   make bench  the short benchmark run (bench/README.md)
#   make fuzz   every libFuzzer harness for FUZZ_SECONDS (default 600) each (tests/fuzz)
#   make chaos  the full fault schedule with its history checker (tests/chaos, RELIABILITY.md)
#   make web-chat  the browser demo of the JavaScript client (examples/web-chat)

BUILD     ?= build
BUILD_SAN ?= build-asan
CMAKE_GEN := $(shell command -v ninja >/dev/null 2>&1 && echo "-G Ninja")

.PHONY: all build run web-chat test test-only bench fuzz chaos deps services-up services-down format asan clean

all: build

deps:
	@bash tests/infra/install-deps.sh

$(BUILD)/CMakeCache.txt:
	cmake -S . -B $(BUILD) $(CMAKE_GEN) -DCMAKE_BUILD_TYPE=RelWithDebInfo

build: $(BUILD)/CMakeCache.txt
	cmake --build $(BUILD) -j

run:
	@command -v protoc-c >/dev/null 2>&1 && pkg-config --exists grpc libwebsockets libjwt jansson hiredis rdkafka jemalloc || bash tests/infra/install-deps.sh
	@$(MAKE) --no-print-directory build
	./$(BUILD)/meshgate $(ARGS)

# The web-chat demo (examples/web-chat) on http://127.0.0.1:8000, talking to `make run`'s gateway.
web-chat:
	@command -v npm >/dev/null 2>&1 || bash tests/infra/install-deps.sh
	@cd clients/js && { [ -d node_modules ] || PUPPETEER_SKIP_DOWNLOAD=1 npm ci --no-audit --no-fund; } && npm run --silent build
	node examples/web-chat/serve.mjs $(ARGS)

asan:
	cmake -S . -B $(BUILD_SAN) $(CMAKE_GEN) -DCMAKE_BUILD_TYPE=Debug -DMG_SANITIZE=ON
	cmake --build $(BUILD_SAN) -j

test:
	@bash scripts/test.sh

# Tests only, against services already up (tests/infra/services.sh up).
test-only: build
	@bash scripts/run-tests.sh $(BUILD)

bench: build
	@bash bench/run.sh

BUILD_FUZZ   ?= build-fuzz
FUZZ_SECONDS ?= 600
fuzz:
	CC=clang cmake -S . -B $(BUILD_FUZZ) $(CMAKE_GEN) -DCMAKE_BUILD_TYPE=RelWithDebInfo -DMG_FUZZ=ON -DMG_BUILD_TESTS=OFF
	cmake --build $(BUILD_FUZZ) -j
	bash tests/fuzz/run.sh $(BUILD_FUZZ) $(FUZZ_SECONDS)

# Four gateways under 20,000 messages in two minutes while faults are injected; starts and stops
# its own Redis Cluster, Kafka and Consul (tests/chaos/run.sh). `make test` runs the short one.
chaos: build
	@bash tests/chaos/run.sh $(BUILD) full

services-up:
	@bash tests/infra/services.sh up

services-down:
	@bash tests/infra/services.sh down

format:
	clang-format -i $$(git ls-files '*.c' '*.h')

clean:
	rm -rf $(BUILD) $(BUILD_SAN) $(BUILD_FUZZ)
