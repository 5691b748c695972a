#!/usr/bin/env bash
# Hot reload under load (issue 17 acceptance): a 30 s `fastpath-gateway bench` stream run (c=8)
# against a 2-worker gateway while its config is reloaded 10 times, then one invalid reload.
# Prints the bench's request and error counts, the reload results and /proc/loadavg.
# Run from the repo root: bash benchmarks/reload_under_load.sh   (uses ports 19311-19312)
W=$(mktemp -d); cd "$W"
set -e
G=$OLDPWD/.venv/bin/fastpath-gateway
PY=$OLDPWD/.venv/bin/python
$PY -m gateway.dev.openai_mock --port 19311 --log-level WARNING >/dev/null 2>&1 &
MOCK=$!
cat > gw.yaml <<Y
server: {host: 127.0.0.1, workers: 2}
providers:
  - {name: m, base_url: 'http://127.0.0.1:19311/v1'}
models:
  - name: echo
    provider: m
    upstream_model: mock-echo
Y
cp gw.yaml good.yaml
sleep 1
export FASTPATH_GATEWAY_DATA_DIR=$W/data
$G serve --config gw.yaml --port 19312 --log-level warning > gw.log 2>&1 &
GW=$!
for i in $(seq 50); do curl -s -o /dev/null http://127.0.0.1:19312/healthz && break; sleep 0.2; done
$G bench --url http://127.0.0.1:19312/v1/chat/completions --model echo --stream --concurrency 8 --duration 30s --warmup 1s --input-tokens fixed:16 --max-tokens 16 --no-progress --json bench.json > bench.out 2>&1 &
B=$!
sleep 3
for i in $(seq 10); do
  sed -i "s/upstream_model: mock-echo.*/upstream_model: mock-echo  # gen $i/" gw.yaml
  $G reload --port 19312 >> reload.out 2>&1 || echo "reload $i failed" >> reload.out
  sleep 2
done
echo "models: [" > bad.yaml; cp gw.yaml keep.yaml; cp bad.yaml gw.yaml
$G reload --port 19312 >> reload.out 2>&1 && echo "INVALID ACCEPTED" >> reload.out || echo "invalid refused (as it should)" >> reload.out
cp keep.yaml gw.yaml
wait $B
kill $GW; wait $GW 2>/dev/null || true
kill $MOCK
$PY -c "
import json; r=json.load(open('bench.json'))['runs'][0]
print('requests', r['requests'], 'sent_total', r['sent_total'], 'errors', r['errors'], 'error_kinds', r['error_kinds'])
print('ttft p50', r['ttft_ms']['p50'], 'p99', r['ttft_ms']['p99'])"
cat reload.out | tail -13
grep -c "config reloaded" gw.log || true
cat /proc/loadavg
