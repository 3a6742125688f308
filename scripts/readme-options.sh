#!/usr/bin/env bash
# Regenerates the options table in README.md from `meshgate --help-markdown`
# (the one configuration table). tests/gateway/test_config.c fails when the
# README and the binary disagree.
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-build/meshgate}
table=$("$bin" --help-markdown)
python3 - "$table" <<'PY'
import sys, re
table = sys.argv[1]
s = open("README.md").read()
s = re.sub(r"(<!-- options:begin -->\n).*?(<!-- options:end -->)",
           lambda m: m.group(1) + table + "\n" + m.group(2), s, flags=re.S)
open("README.md", "w").write(s)
PY
