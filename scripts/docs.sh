#!/usr/bin/env bash
# The documentation site (mkdocs-material + mkdocstrings, configured in mkdocs.yml).
#   bash scripts/docs.sh            # build into ./site in strict mode: a broken link or API
#                                   # reference fails the build (CI runs this)
#   bash scripts/docs.sh --serve    # browse it at http://127.0.0.1:8000 while editing
# Needs `bash scripts/setup.sh --test` (the docs extra). The python blocks of the pages run in
# tests/test_guides.py; the site itself is not committed.
set -euo pipefail
cd "$(dirname "$0")/.."
export NO_MKDOCS_2_WARNING=1
if [ "${1:-}" = "--serve" ]; then exec .venv/bin/mkdocs serve; fi
.venv/bin/mkdocs build --strict
echo "docs built in site/ ($(find site -name '*.html' | wc -l) pages)"
