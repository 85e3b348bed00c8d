#!/usr/bin/env bash
# Runs the kit's GPU work on the lent H100 (see ../shared/device/README.md), from the repo root:
#   bash tools/device_run.sh setup                 # wheels + random-weight models (tiny, 7b)
#   bash tools/device_run.sh gputest [PYTEST ARGS] # the GPU tests against the tiny model
#   bash tools/device_run.sh gate                  # AWQ build + LMDeploy quality gate, GPU memory trace
#   bash tools/device_run.sh lmdeploy SETTINGS     # benchmarks/gpu_lmdeploy.py on the 7b model
#   bash tools/device_run.sh bench SETTINGS        # python -m deploy bench on the 7b model (REPEATS=3,
#                                                    # LIMIT=s; REFERENCE=SETTINGS: api_server rows too)
#   bash tools/device_run.sh bench-internlm2 SETTINGS  # the same on InternLM2-7B shapes
#   bash tools/device_run.sh short                 # experiments/short_answers.py on the 7b model
#   bash tools/device_run.sh overhead [ARGS]       # gpu_overhead.py: the kit's server against lmdeploy
#                                                    # api_server (MODEL=DIR, default the 7b Llama)
#   bash tools/device_run.sh tp                    # engine.tp 1 against 2 (needs 2 GPUs)
#   bash tools/device_run.sh internlm2 [BACKEND]   # InternLM2-shaped checkpoints through the kit
#   bash tools/device_run.sh flagship [RECIPES] [BACKENDS]  # benchmarks/gpu_flagship.py: the InternLM2
#                                                    # recipes built, gated and served on InternLM2-7B shapes
#   bash tools/device_run.sh logits               # experiments/logits_answers.py and gpu_internlm2_logits.py (PyTorch engine)
#   bash tools/device_run.sh kvlogits [MODEL NAME]  # experiments/logits_answers.py with KV none, int8, int4 (KVS)
#   bash tools/device_run.sh chatlogits             # experiments/chat_logits.py on InternLM2-7B shapes
#   bash tools/device_run.sh profile [BACKEND]     # benchmarks/profile_engine_start.py: the server process's
#                                                    # start-up steps, timed and profiled, plus -X importtime
#   bash tools/device_run.sh coldstart BACKEND [BASELINE]  # benchmarks/cold_start.py, 3 runs, InternLM2-7B
#                                                    # shapes; with BASELINE (a kit checkout) 3 runs of each, alternated
#   bash tools/device_run.sh coldstart-tf BACKEND  # the same, the machine's transformers against
#                                                    # .device/tfwhl's (a newer one), alternated
#   bash tools/device_run.sh tune [BUDGET] [GPU]   # python -m deploy tune on the 7b model, 16 sessions
#   bash tools/device_run.sh fp8 [--reference]     # benchmarks/gpu_fp8.py on the 7b model (TurboMind)
#   bash tools/device_run.sh decodeprofile [SETTINGS]  # benchmarks/gpu_decode_profile.py: batch-1 decode per weight
#                                                    # format in LMDeploy's pipeline, timed and kernel-profiled
#   bash tools/device_run.sh tm-stage              # keep .device/tm-carry/part* in /tmp/tmparts
#   bash tools/device_run.sh tm-assemble           # TurboMind's .so and CUDA 12 libraries in place
# TurboMind: ../shared/device/fetch-turbomind-parts.sh .device/tm-parts makes 9 parts here; carry one
# at a time as .device/tm-carry (a call carries at most 64 MiB), `tm-stage` after each, back to back
# (the machine goes back after 30 s idle), then `tm-assemble` (it checks their MD5).
# Needs .device/whl (scripts from ../shared/device/fetch-lmdeploy-wheels.sh plus pytest, psutil)
# and .device/tok32k carried with the call. Results go to $OUT (default ./out).
set -euo pipefail
OUT=${OUT:-$PWD/out}
MODELS=${MODELS:-/tmp/xlab-models}
mkdir -p "$OUT" "$MODELS"
if [ ! -d /tmp/site/lmdeploy ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device/whl/*.whl
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# TurboMind, once assembled by `tm-assemble`: its CUDA 12 libraries live in /tmp/tm.
if [ -f /tmp/tm/libcublas.so.12 ]; then
  export LD_LIBRARY_PATH=/tmp/tm:/tmp/site/lmdeploy/turbomind/lib:${LD_LIBRARY_PATH:-}
fi
model() {  # model tiny|7b: build once per machine
  [ -f "$MODELS/$1/config.json" ] || python3 tools/make_random_llama.py "$1" "$MODELS/$1" .device/tok32k >/dev/null
  echo "$MODELS/$1"
}
internlm2_model() {  # internlm2_model NAME MAKER-ARGS...: a random InternLM2 checkpoint, made once per machine
  [ -f "$MODELS/$1/config.json" ] || python3 tools/make_random_internlm2.py "$MODELS/$1" .device/tok32k \
    "${@:2}" >/dev/null
  echo "$MODELS/$1"
}
# InternLM2-7B shapes carrying the project's transformers code (tests/fixtures/internlm2_hf), and small ones
# (the small ones are also made by gpu_internlm2_logits.py).
internlm2_code() { internlm2_model internlm2-7b-code --size 7b --modeling; }
internlm2_small() { internlm2_model internlm2-small-gqa --size small --modeling; }
cold_once() {  # cold_once TAG [CODE] [PYTHONPATH]: one start to the first token, LMDeploy's env check skipped
  PYTHONPATH=${3:-$PYTHONPATH} LMDEPLOY_ENABLE_CHECK_ENV=0 python3 -m benchmarks.cold_start "/tmp/cold-$backend.yaml" \
    --runs 1 --code "${2:-$PWD}" --json "/tmp/cold-pack/cold-$backend-$1.json" --logs "/tmp/cold-pack/$1"
}
case "${1:-setup}" in
  setup) nvidia-smi -L; model tiny; model 7b ;;
  gputest) XLAB_GPU_TEST_MODEL=$(model tiny) XLAB_GPU_TEST_INTERNLM2=$(internlm2_small) python3 -m pytest -q \
             -p no:cacheprovider -rs tests/engines/test_lmdeploy_gpu.py tests/engines/test_lmdeploy_config.py "${@:2}" ;;
  gate) model tiny >/dev/null
        # GPU memory every 200 ms while the build runs: the gate's peak, one engine at a time.
        nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 200 \
          > "$OUT/gate-gpu-memory.csv" & trace=$!
        status=0
        python3 -m deploy build tools/device/tiny-awq-gate.yaml > "$OUT/gate-build.log" 2>&1 || status=$?
        kill $trace
        echo "build exit $status" | tee -a "$OUT/gate-build.log"
        cp "${XLAB_DEPLOY_HOME:-$HOME/.cache/xlab-deploy}/builds/tiny-awq-gate/manifest.json" "$OUT/gate-manifest.json" || true
        serve=0
        timeout 120 python3 -m deploy serve tools/device/tiny-awq-gate.yaml --port 0 \
          > "$OUT/gate-serve.log" 2>&1 || serve=$?
        echo "serve exit $serve" | tee -a "$OUT/gate-serve.log"
        tail -n 5 "$OUT/gate-build.log" "$OUT/gate-serve.log" ;;
  lmdeploy) python3 -m benchmarks.gpu_lmdeploy --model "$(model 7b)" --out "$OUT/gpu" \
             --settings "${2:-fp16,kv8,kv4,awq}" ;;
  bench|bench-internlm2)
         status=0
         recipe=tools/device/llama7b-random.yaml
         if [ "$1" = bench ]; then model 7b >/dev/null; else
           recipe=tools/device/internlm2-7b-random.yaml
           internlm2_code >/dev/null
         fi
         out="/tmp/$1-gpu" settings=${2:-lmdeploy-fp16}
         # LIMIT s from here for the benchmark (a setting cut off is measured again by the next
         # call; finished ones are kept). A setting that fails is logged and left out, and the
         # rest go on. Then REFERENCE's settings under api_server (gpu_bench_reference.py) if
         # the benchmark finished and REFLIMIT s remain.
         deadline=$((SECONDS + ${LIMIT:-540}))
         while [ -n "$settings" ] && [ $((deadline - SECONDS)) -gt 10 ]; do
           status=0
           timeout --kill-after=15 $((deadline - SECONDS)) python3 -m deploy bench "$recipe" --out "$out" \
             --settings "$settings" --repeats "${REPEATS:-1}" || status=$?
           { [ $status = 0 ] || [ $status = 124 ] || [ $status = 137 ]; } && break
           failed=$(for s in ${settings//,/ }; do [ -f "$out/$s.json" ] || { echo "$s"; break; }; done)
           [ -n "$failed" ] || break  # every setting measured: the report failed
           echo "bench: $failed failed (exit $status); going on without it" | tee -a "$out/failed.txt"
           settings=$(echo ",$settings," | sed "s/,$failed,/,/; s/^,//; s/,$//")
         done
         if [ $status = 0 ] && [ -n "${REFERENCE:-}" ] && [ $((deadline - SECONDS)) -gt 60 ]; then
           timeout --kill-after=15 $((deadline - SECONDS)) python3 -m benchmarks.gpu_bench_reference "$out" \
             --settings "$REFERENCE" || status=$?
         fi
         # One archive: a call brings back only a few files. Logs are cut to their last 8 kB.
         rm -rf /tmp/bench-pack && mkdir -p /tmp/bench-pack/logs
         cp "$out"/*.json "$out"/report.md "$out"/*.png "$out"/failed.txt /tmp/bench-pack/ 2>/dev/null || true
         cp -r "$out"/recipes /tmp/bench-pack/ 2>/dev/null || true
         for f in "$out"/logs/*.log; do tail -c 8000 "$f" > "/tmp/bench-pack/logs/${f##*/}"; done
         tar czf "$OUT/$1.tgz" -C /tmp/bench-pack .
         [ $status = 0 ] || tail -c 2000 "$out"/logs/*.log
         exit $status ;;
  short) python3 -m experiments.short_answers --model "$(model 7b)" --out "$OUT" ;;
  overhead) python3 -m benchmarks.gpu_overhead --model "${MODEL:-$(model 7b)}" --out /tmp/overhead ${@:2}
            cp /tmp/overhead/overhead.json /tmp/overhead/*.log "$OUT"/ ;;
  tp) status=0
      python3 -m benchmarks.gpu_tp --model "$(model 7b)" --out /tmp/tp || status=$?
      cp /tmp/tp/tp.json /tmp/tp/memory-tp2.json /tmp/tp/*.log "$OUT"/ 2>/dev/null || true
      exit $status ;;
  internlm2) status=0
             backend=${2:-lmdeploy-pytorch}
             python3 -m benchmarks.gpu_internlm2 --models "$MODELS" --tok .device/tok32k \
               --out "/tmp/internlm2-$backend" --backend "$backend" || status=$?
             mkdir -p "$OUT/$backend"
             cp "/tmp/internlm2-$backend"/internlm2.json "/tmp/internlm2-$backend"/*.log "$OUT/$backend"/ 2>/dev/null || true
             exit $status ;;
  flagship) status=0
            timeout "${LIMIT:-540}" python3 -m benchmarks.gpu_flagship --model "$(internlm2_code)" --out /tmp/flagship \
              --recipes "${2:-w4a16-kv8,w4a16,kv8}" --backends "${3:-auto,lmdeploy-pytorch}" || status=$?
            # One archive: a call brings back only a few files. Logs are cut to their last 8 kB.
            rm -rf /tmp/flagship-pack && mkdir -p /tmp/flagship-pack
            cp /tmp/flagship/*.json /tmp/flagship/*.yaml /tmp/flagship/*.csv /tmp/flagship-pack/ 2>/dev/null || true
            for f in /tmp/flagship/*.log; do tail -c 8000 "$f" > "/tmp/flagship-pack/${f##*/}"; done
            tar czf "$OUT/flagship.tgz" -C /tmp/flagship-pack .
            exit $status ;;
  logits) status=0  # [MODEL for gpu_logits.py, default the small InternLM2 the first script makes]
          python3 -m experiments.internlm2_logits --tok .device/tok32k --models "$MODELS" \
            --out "$OUT/internlm2-logits.json" --variants "${VARIANTS:-gqa,mha,theta1e4}" || status=$?
          python3 -m experiments.logits_answers --model "${2:-$MODELS/internlm2-small-gqa}" --kv int8 \
            --out "$OUT/logits-answers.json" || status=$?
          exit $status ;;
  kvlogits) status=0  # experiments/logits_answers.py per KV cache setting (KVS), on MODEL (default the small InternLM2)
            small=$(internlm2_small)
            for kv in ${KVS:-none int8 int4}; do
              python3 -m experiments.logits_answers --model "${2:-$small}" --kv "$kv" \
                --out "$OUT/logits-answers-${3:-small}-kv$kv.json" > "/tmp/kvlogits-$kv.log" 2>&1 || status=$?
            done
            exit $status ;;
  chatlogits) python3 -m experiments.chat_logits --model "$(internlm2_code)" --out "$OUT/chat-logits-7b.json" ;;
  profile) tiny=$(internlm2_model internlm2-tiny --size tiny)  # config and tokenizer are all the steps read
           python3 -X importtime -m benchmarks.profile_engine_start "$tiny" --backend "${2:-lmdeploy-turbomind}" \
             --out /tmp/profile-start 2> /tmp/importtime.txt
           # -X importtime's lines, the 60 costliest by cumulative microseconds.
           grep '^import time:' /tmp/importtime.txt | sort -t'|' -k2 -n -r > /tmp/importtime-sorted.txt
           head -60 /tmp/importtime-sorted.txt > /tmp/profile-start/importtime-top.txt
           tar czf "$OUT/profile-start.tgz" -C /tmp/profile-start . ;;
  coldstart|coldstart-tf)
             backend=${2:-lmdeploy-turbomind}
             weights=$(internlm2_model internlm2-7b --size 7b)
             printf 'name: cold-%s\nmodel:\n  source: local\n  path: %s\nengine:\n  backend: %s\n  dtype: float16\n  session_len: 4096\n  max_batch_size: 64\n  cache_max_entry_count: 0.2\nserve:\n  mode: api\n' \
               "$backend" "$weights" "$backend" > "/tmp/cold-$backend.yaml"
             rm -rf /tmp/cold-pack && mkdir -p /tmp/cold-pack
             if [ "$1" = coldstart-tf ]; then
             # The machine's transformers against the wheels in .device/tfwhl (a newer transformers and the
             # tokenizers, safetensors and regex it needs; not huggingface_hub 2, which needs httpx2),
             # installed apart in /tmp/site-tf and put first on PYTHONPATH for its side. One discarded
             # start first, then 3 of each, alternated.
             [ -d /tmp/site-tf/transformers ] || python3 -m pip install -q --no-index --no-deps --no-compile \
               --target /tmp/site-tf .device/tfwhl/*.whl
             for side in machine wheels; do
               pp=$PYTHONPATH; [ $side = machine ] || pp=/tmp/site-tf:$PYTHONPATH
               PYTHONPATH=$pp python3 -c "import transformers, tokenizers, huggingface_hub as h; print('$side', transformers.__version__, tokenizers.__version__, h.__version__)" || echo "$side: import failed"
             done | tee /tmp/cold-pack/versions.txt
             cold_once discarded
             for i in 1 2 3; do
               cold_once "machine-$i"
               cold_once "wheels-$i" "$PWD" "/tmp/site-tf:$PYTHONPATH"
             done
             # The server process's steps under the newer transformers (`profile` above, on the machine's).
             tiny=$(internlm2_model internlm2-tiny --size tiny)
             PYTHONPATH=/tmp/site-tf:$PYTHONPATH python3 -m benchmarks.profile_engine_start "$tiny" --backend "$backend" \
               --out /tmp/cold-pack/profile-wheels > /dev/null 2>&1 || echo "profile under the wheels failed"
             elif [ -z "${3:-}" ]; then
               python3 -m benchmarks.cold_start "/tmp/cold-$backend.yaml" --runs 3 --json "$OUT/cold-$backend.json" \
                 --logs "/tmp/cold-pack/$backend"
             else
             # Against a baseline checkout of the kit ($3, e.g. `git archive` of an older commit carried
             # in .device/): runs alternate, and both skip LMDeploy's environment check, as the kit
             # does on a machine where it passed once.
             for i in 1 2 3; do
               cold_once "baseline-$i" "$3"
               cold_once "current-$i"
             done
             fi
             # Each log cut to the kit's own phase lines, then its last 8 kB.
             for f in /tmp/cold-pack/*.log; do
               { grep -a ' deploy\.' "$f" | cut -c1-400; echo '--- last 8 kB:'; tail -c 8000 "$f"; } > "$f.cut"
               mv "$f.cut" "$f"
             done
             tar czf "$OUT/coldstart.tgz" -C /tmp/cold-pack . ;;
  tune) model 7b >/dev/null
        status=0
        python3 -m deploy tune tools/device/llama7b-random-tune.yaml --sessions 16 --gpu "${3:-A10}" \
          --budget "${2:-7m}" --out /tmp/tune-gpu || status=$?
        # One archive: a call brings back only a few files. Logs are cut to their last 4 kB.
        rm -rf /tmp/tune-pack && mkdir -p /tmp/tune-pack/logs
        cp -r /tmp/tune-gpu/report.* /tmp/tune-gpu/recipe.yaml /tmp/tune-gpu/measured /tmp/tune-gpu/recipes \
          /tmp/tune-gpu/candidates.png /tmp/tune-pack/ 2>/dev/null || true
        for f in /tmp/tune-gpu/logs/*.log; do tail -c 4000 "$f" > "/tmp/tune-pack/logs/${f##*/}"; done
        tar czf "$OUT/tune.tgz" -C /tmp/tune-pack .
        [ $status = 0 ] || tail -c 3000 /tmp/tune-gpu/logs/*.log
        exit $status ;;
  fp8) model 7b >/dev/null  # benchmarks/gpu_fp8.py: FP8 built, gated and served against fp16 (TurboMind)
       XLAB_DEPLOY_HOME=/tmp/fp8-home python3 -m benchmarks.gpu_fp8 --model "$(model 7b)" --out "$OUT/fp8" "${@:2}" ;;
  decodeprofile) status=0
       model 7b >/dev/null
       python3 -m benchmarks.gpu_decode_profile --model "$(model 7b)" --out /tmp/decode-profile \
         --deadline "${DEADLINE:-380}" ${2:+--settings "$2"} || status=$?
       # One archive: a call brings back only a few files. Logs are cut to their last 8 kB.
       for f in /tmp/decode-profile/*.log; do tail -c 8000 "$f" > "$f.cut" && mv "$f.cut" "$f"; done
       tar czf "$OUT/decode-profile.tgz" -C /tmp/decode-profile --exclude='*.trace.json' .
       exit $status ;;
  tm-stage) mkdir -p /tmp/tmparts && cp .device/tm-carry/part* /tmp/tmparts/ && ls /tmp/tmparts ;;
  tm-assemble) cp .device/tm-carry/MD5 /tmp/tmparts/ 2>/dev/null || true
               (cd /tmp/tmparts && cat part* | md5sum | diff - MD5) || { echo "TurboMind parts: MD5 differs" >&2; exit 1; }
               mkdir -p /tmp/tm && cat /tmp/tmparts/part* | gzip -d | tar -C /tmp/tm -xf -
               cp /tmp/tm/_turbomind*.so /tmp/site/lmdeploy/turbomind/
               mkdir -p /tmp/site/lmdeploy/turbomind/lib && cp /tmp/tm/libturbomind_nccl_stub.so /tmp/site/lmdeploy/turbomind/lib/
               LD_LIBRARY_PATH=/tmp/tm:/tmp/site/lmdeploy/turbomind/lib python3 -c \
                 "from lmdeploy import turbomind; print('TurboMind available:', turbomind.is_available())" ;;
  *) echo "unknown step $1" >&2; exit 2 ;;
esac
