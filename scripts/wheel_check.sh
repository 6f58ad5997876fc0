#!/usr/bin/env bash
# Build first: python -m build --wheel --outdir /tmp/dist .
# Install the wheel non-editable into a fresh venv, then use it from /tmp.
set -euo pipefail
rm -rf /tmp/wheelvenv /tmp/wheelrun; python3 -m venv /tmp/wheelvenv; . /tmp/wheelvenv/bin/activate
pip install -q --upgrade pip >/dev/null 2>&1
pip install -q /tmp/dist/age_explorer-0.1.0-py3-none-any.whl 2>&1 | grep -v WARNING || true
mkdir -p /tmp/wheelrun && cd /tmp/wheelrun
echo "--- top-level names in site-packages:"; ls /tmp/wheelvenv/lib/python3.11/site-packages | grep -iE "^(core|explorer|age_explorer|assets)" || true
age-explorer generate --model toy --prompt "a red circle" --seeds 0-1 --out samples/ 2>&1 | tail -2
ls samples | head
(age-explorer-app --port 7931 --data-dir /tmp/wheelrun/data > app.log 2>&1 &) ; for i in $(seq 1 90); do curl -s -o /dev/null -w "%{http_code}" http://127.0.0.1:7931/ 2>/dev/null | grep -q 200 && break; sleep 2; done
echo "--- app HTTP status: $(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:7931/)"
python -c "
from gradio_client import Client
c = Client('http://127.0.0.1:7931/', verbose=False)
print('graphs:', [g['graph'] for g in c.predict(api_name='/list_graphs')])
" 2>&1 | tail -1 || true
pkill -f "age-explorer-app --port 7931" || true
