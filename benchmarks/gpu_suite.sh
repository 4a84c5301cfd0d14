#!/usr/bin/env bash
# Everything glmrt runs on a GPU, in one command, on a bare GPU machine that holds only this
# repository and a Python with torch, triton, transformers and pybind11: install glmrt, run the
# GPU tests, the benchmarks, and (time permitting) the Triton kernel tests compiled for the GPU.
# Every step has a timeout (the run stays inside --budget), a failing step does not stop the
# ones after it, and everything lands in one folder (default benchmarks/results/<date>-<gpu>/):
#   SUMMARY.md       steps (status, seconds) and the benchmarks' key numbers
#   environment.md   GPU, driver, CUDA, versions, commit and dirty state (+ nvidia-smi.txt,
#                    git-status.txt, git-diff.patch)
#   steps.tsv        one row per step: name, status, exit code, seconds, timeout
#   logs/STEP.log    each step's stdout and stderr
#   *.json, *.md     each benchmark's results
# Exit status: 0 when every required step passed, 1 when one did not, 2 for a usage error or
# no GPU. kernel-tests-gpu is advisory: its failure is recorded but does not set the status.
set -u -o pipefail

usage() {
    cat <<'EOF'
usage: bash benchmarks/gpu_suite.sh [options]
  --out DIR         results folder (default benchmarks/results/<UTC date-time>-<gpu>)
  --quick           short run: benchmarks in --smoke mode (tiny sizes), no kernel-tests-gpu
  --tar PATH        also pack the results folder into PATH (.tar.gz), e.g. $OUT/suite.tar.gz
  --budget SECONDS  wall-clock budget for all steps (default 840); each step's timeout is
                    cut to what is left, and steps with too little left are skipped
  --only LIST       run only these steps (comma-separated names, see --dry-run)
  --skip LIST       skip these steps
  --dry-run         print the steps and their commands, run nothing (no GPU needed)
  --allow-cpu       run without a GPU (only to test the suite's own plumbing)
  environment: PYTHON (default python3); GLMRT_GIT_COMMIT names the commit when the tree has
  no git metadata
EOF
}

die() {
    echo "gpu_suite: $*" >&2
    exit 2
}

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PYTHON=${PYTHON:-python3}
STEPS=(install cpp-ext gpu-tests bench-kernels bench-e2e bench-spec bench-host bench-structured bench-patchify bench-serve bench-documents bench-capacity bench-glm-image kernel-tests-gpu)
MIN_STEP_SECONDS=10  # a step given less than this is skipped rather than started
out="" quick=0 dry_run=0 allow_cpu=0 tar_path="" budget=840 only="" skip=""

while (($#)); do
    case $1 in
        --out) (($# >= 2)) || die "--out needs a folder"; out=$2; shift ;;
        --tar) (($# >= 2)) || die "--tar needs a path"; tar_path=$2; shift ;;
        --budget) (($# >= 2)) || die "--budget needs a number of seconds"; budget=$2; shift ;;
        --only) (($# >= 2)) || die "--only needs a list of steps"; only=$2; shift ;;
        --skip) (($# >= 2)) || die "--skip needs a list of steps"; skip=$2; shift ;;
        --quick) quick=1 ;;
        --dry-run) dry_run=1 ;;
        --allow-cpu) allow_cpu=1 ;;
        -h | --help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
    shift
done
[[ $budget =~ ^[0-9]+$ ]] || die "--budget must be a whole number of seconds, got '$budget'"
for name in ${only//,/ } ${skip//,/ }; do
    [[ " ${STEPS[*]} " == *" $name "* ]] || die "unknown step '$name' in --only/--skip (steps: ${STEPS[*]})"
done

listed() {  # listed NAME LIST: is NAME in the comma-separated LIST?
    [[ ",$2," == *",$1,"* ]]
}

# ----------------------------------------------------------------------------- GPU and results dir

gpu_name=$(timeout 20 nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)
if ((!dry_run && !allow_cpu)); then
    [[ -n $gpu_name ]] || die "no CUDA GPU: nvidia-smi is missing or lists no GPU; this suite needs one (--allow-cpu only tests its plumbing)"
    timeout 120 "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)' \
        || die "nvidia-smi lists '$gpu_name' but $PYTHON's torch sees no CUDA device"
fi
if [[ -n $gpu_name ]]; then  # "NVIDIA H100 80GB HBM3" -> h100; an unknown naming -> the whole name
    slug=$(tr '[:upper:]' '[:lower:]' <<<"$gpu_name" | grep -oE '\b[a-z]{1,2}[0-9]{1,3}\b' | head -n 1)
    [[ -n $slug ]] || slug=$(tr '[:upper:]' '[:lower:]' <<<"$gpu_name" | tr -cs 'a-z0-9' '-' | sed 's/^-//; s/-$//')
else
    slug=cpu
fi
out=${out:-$REPO/benchmarks/results/$(date -u +%Y%m%d-%H%M%S)-$slug}
if ((!dry_run)); then
    mkdir -p "$out/logs" || die "cannot create the results folder '$out'"
    out=$(cd "$out" && pwd)
    if [[ -n $tar_path ]]; then
        mkdir -p "$(dirname "$tar_path")" || die "cannot create the folder of --tar '$tar_path'"
        tar_path=$(cd "$(dirname "$tar_path")" && pwd)/$(basename "$tar_path")
        [[ $tar_path != "$out"/* ]] || die "--tar '$tar_path' must lie outside the results folder '$out'"
    fi
fi

# ----------------------------------------------------------------------------- the steps

# One entry per step, in run order: its time limit (seconds), whether its failure sets the exit
# status, and its command (run by bash -c from the repository root; empty: the script is absent).
declare -A LIMIT REQUIRED COMMAND
host_script=benchmarks/host_overhead.py
py=$(printf %q "$PYTHON")
o=$(printf %q "$out")
smoke=$( ((quick)) && echo " --smoke")
add() {  # add NAME LIMIT REQUIRED COMMAND
    LIMIT[$1]=$2 REQUIRED[$1]=$3 COMMAND[$1]=$4
}
add install 300 1 "$py -m pip install --no-build-isolation --no-deps -e ."
add cpp-ext 60 1 "$py -c 'import glmrt._C; print(\"glmrt._C built:\", glmrt._C.__file__)'"
add gpu-tests 300 1 "$py -m pytest -m gpu -q -p no:cacheprovider tests"
add bench-kernels 300 1 "$py benchmarks/kernel_bench.py --out $o$smoke"
add bench-e2e 420 1 "$py benchmarks/e2e.py --out $o$smoke"
add bench-spec 300 1 "$py benchmarks/spec_decode.py --out $o$smoke"
if [[ -f $REPO/$host_script ]]; then
    add bench-host 180 1 "$py $host_script --out $o$smoke"
else
    add bench-host 180 1 ""  # skipped, with a note; not a failure
fi
add bench-structured 240 1 "$py benchmarks/structured.py --out $o$smoke"
add bench-patchify 120 1 "$py benchmarks/patchify.py --out $o$( ((quick)) && echo " --repeats 3")"
add bench-serve 300 1 "$py benchmarks/serve.py --out $o$smoke"
add bench-documents 300 1 "$py benchmarks/documents.py --out $o$smoke"
add bench-capacity 180 1 "$py benchmarks/capacity.py --out $o$smoke"  # after bench-documents: reads its result
add bench-glm-image 420 1 "$py benchmarks/glm_image.py --out $o$smoke"
# Packages the GPU image lacks travel as wheels in .whl/ (benchmarks/fetch_wheels.sh fetches them):
# installed aside, into a folder put first on PYTHONPATH, never over the image's own packages.
if ((!dry_run)) && compgen -G "$REPO/.whl/*.whl" >/dev/null; then
    wheel_site=$(mktemp -d)
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$wheel_site" \
        "$REPO"/.whl/*.whl && export PYTHONPATH=$wheel_site${PYTHONPATH:+:$PYTHONPATH}
fi
# glmrt serve needs the server extra (glmrt[serve]), which the install step (--no-deps) does not add:
# without it bench-serve is skipped, with the import error as its note; not a failure
serve_missing=$(timeout 120 "$PYTHON" -c 'import fastapi, uvicorn, prometheus_client, httpx' 2>&1) \
    && serve_missing="" || serve_missing=$(tail -n 1 <<<"$serve_missing")
# glmrt parse needs glmrt[documents] (pypdfium2) and bench-documents' SDK side glmrt serve: without
# them bench-documents is skipped the same way
documents_missing=$(timeout 120 "$PYTHON" -c 'import pypdfium2, transformers, fastapi, uvicorn, httpx' 2>&1) \
    && documents_missing="" || documents_missing=$(tail -n 1 <<<"$documents_missing")
# Last, with whatever time is left: tests/kernels with TRITON_INTERPRET unset, so that on a GPU the
# kernels are compiled and run for real (they are written for the interpreter).
add kernel-tests-gpu 240 0 "env -u TRITON_INTERPRET $py -m pytest -q -p no:cacheprovider tests/kernels"

skip_reason() {  # why step $1 is not run, or nothing
    if [[ -n $only ]] && ! listed "$1" "$only"; then echo "not in --only"
    elif listed "$1" "$skip"; then echo "--skip"
    elif ((quick)) && [[ $1 == kernel-tests-gpu ]]; then echo "--quick"
    elif [[ -z ${COMMAND[$1]} ]]; then echo "$host_script is absent"
    elif [[ $1 == bench-serve && -n $serve_missing ]]; then echo "glmrt[serve] is not installed ($serve_missing)"
    elif [[ $1 == bench-capacity && -n $documents_missing ]]; then echo "glmrt[documents] is not installed ($documents_missing)"
    elif [[ $1 == bench-documents && -n $documents_missing ]]; then
        echo "glmrt[documents] or glmrt[serve] is not installed ($documents_missing)"
    fi
}

if ((dry_run)); then
    echo "gpu_suite dry run: results would go to $out (GPU: ${gpu_name:-none found}), budget ${budget}s$( ((quick)) && echo ", quick")"
    for i in "${!STEPS[@]}"; do
        name=${STEPS[i]} why=$(skip_reason "${STEPS[i]}")
        kind=$( ((REQUIRED[$name])) && echo required || echo advisory)
        if [[ -n $why ]]; then
            printf '%2d. %-17s skipped (%s)\n' $((i + 1)) "$name" "$why"
        else
            printf '%2d. %-17s timeout %3ss, %-8s  %s\n' $((i + 1)) "$name" "${LIMIT[$name]}" "$kind" "${COMMAND[$name]}"
        fi
    done
    echo "then: environment.md, SUMMARY.md$([[ -n $tar_path ]] && echo ", $tar_path")"
    exit 0
fi

# ----------------------------------------------------------------------------- environment

cd "$REPO" || die "cannot enter $REPO"
# unbuffered logs (a step killed by its timeout keeps what it printed); every model is local, and a
# GPU machine may have no network: the Hugging Face libraries must not try to reach the Hub
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
timeout 30 nvidia-smi >"$out/nvidia-smi.txt" 2>&1
gpu_row=$(timeout 20 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | head -n 1)
driver_cuda=$(grep -oE 'CUDA Version: [0-9.]+' "$out/nvidia-smi.txt" | head -n 1)
nvcc_version=$(timeout 20 nvcc --version 2>/dev/null | grep -oE 'release [0-9.]+' | head -n 1)
versions=$(timeout 120 "$PYTHON" - 2>&1 <<'EOF' | tail -n 1
import importlib.metadata as m, platform, torch
def v(name):
    try:
        return m.version(name)
    except m.PackageNotFoundError:
        return "absent"
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}), "
      f"triton {v('triton')}, transformers {v('transformers')}, pybind11 {v('pybind11')}")
EOF
)
# Results are outputs, not code: they do not make the tree dirty.
git_() {  # the copy may belong to another user than the one running this (root on a GPU box)
    git -c safe.directory='*' -C "$REPO" "$@"
}
if commit=$(git_ rev-parse HEAD 2>/dev/null); then
    git_ status --porcelain -- . ':(exclude)benchmarks/results' >"$out/git-status.txt"
    git_ diff HEAD -- . ':(exclude)benchmarks/results' >"$out/git-diff.patch"
    changed=$(wc -l <"$out/git-status.txt")
    dirty=$( ((changed)) && echo "yes ($changed changed or untracked paths: git-status.txt, git-diff.patch)" || echo no)
else
    commit=${GLMRT_GIT_COMMIT:-unknown} dirty="unknown (no git metadata in this copy)"
fi
started=$(date -u '+%Y-%m-%d %H:%M:%S UTC')
cat >"$out/environment.md" <<EOF
# Environment

- date: $started
- host: $(uname -n), $(uname -srm), $(nproc) CPU cores
- GPU: ${gpu_row:-none found}
- CUDA: driver's ${driver_cuda:-CUDA Version: unknown}; nvcc ${nvcc_version:-absent}
- $versions
- commit: \`$commit\`, dirty: $dirty
- mode: $( ((quick)) && echo quick || echo full), budget ${budget}s
EOF

# ----------------------------------------------------------------------------- running

declare -A STATUS RC SECONDS_TAKEN TIMEOUT NOTE
suite_start=$(date +%s)
deadline=$((suite_start + budget))
failed=0
echo "gpu_suite: ${gpu_name:-no GPU (--allow-cpu)}, results in $out"
for i in "${!STEPS[@]}"; do
    name=${STEPS[i]} log=$out/logs/${STEPS[i]}.log
    RC[$name]=- TIMEOUT[$name]=- SECONDS_TAKEN[$name]=- NOTE[$name]=""
    why=$(skip_reason "$name")
    left=$((deadline - $(date +%s)))
    if [[ -n $why ]]; then
        STATUS[$name]=SKIPPED NOTE[$name]=$why
    elif ((left < MIN_STEP_SECONDS)); then
        STATUS[$name]=SKIPPED NOTE[$name]="budget spent (${left}s left)"
        ((REQUIRED[$name])) && failed=1
    else
        limit=$((LIMIT[$name] < left ? LIMIT[$name] : left))
        start=$(date +%s)
        {
            echo "\$ ${COMMAND[$name]}   # timeout ${limit}s"
            timeout -k 10 "$limit" bash -c "${COMMAND[$name]}" </dev/null
        } >"$log" 2>&1
        rc=$?
        RC[$name]=$rc TIMEOUT[$name]=$limit SECONDS_TAKEN[$name]=$(($(date +%s) - start))
        case $rc in
            0) STATUS[$name]=PASS ;;
            124 | 137) STATUS[$name]=TIMEOUT ;;
            *) STATUS[$name]="FAIL (exit $rc)" ;;
        esac
        if [[ ${COMMAND[$name]} == *pytest* ]]; then  # its tally: "3 passed, 1 skipped in 12.0s"
            NOTE[$name]=$(grep -aE '[0-9]+ (passed|failed|errors?|skipped|deselected)' "$log" | tail -n 1 | tr -d '=' | sed 's/^ *//; s/ *$//')
        fi
        if ((rc)); then
            ((REQUIRED[$name])) && failed=1
            [[ -n ${NOTE[$name]} ]] || NOTE[$name]=$(grep -av '^[[:space:]]*$' "$log" | tail -n 1 | cut -c 1-160)
        fi
    fi
    printf '[%d/%d] %-17s %-14s %5ss  %s\n' $((i + 1)) ${#STEPS[@]} "$name" "${STATUS[$name]}" \
        "${SECONDS_TAKEN[$name]}" "${NOTE[$name]}"
    if [[ ${STATUS[$name]} != PASS && ${STATUS[$name]} != SKIPPED ]]; then
        tail -n 15 "$log" | sed 's/^/    | /'
    fi
done

# ----------------------------------------------------------------------------- summary and tarball

{
    printf 'step\tstatus\texit\tseconds\ttimeout\n'
    for name in "${STEPS[@]}"; do
        printf '%s\t%s\t%s\t%s\t%s\n' "$name" "${STATUS[$name]%% *}" "${RC[$name]}" "${SECONDS_TAKEN[$name]}" "${TIMEOUT[$name]}"
    done
} >"$out/steps.tsv"
key_numbers=$(timeout 120 "$PYTHON" benchmarks/common.py summary "$out" 2>&1) \
    || key_numbers="could not extract them: $key_numbers"
{
    echo "# glmrt GPU suite: ${gpu_name:-no GPU}, $started"
    echo
    echo "- overall: $( ((failed)) && echo "FAIL (a required step did not pass)" || echo PASS)"
    echo "- GPU: ${gpu_row:-none found}; ${driver_cuda:-CUDA Version: unknown}"
    echo "- $versions"
    echo "- commit \`$commit\`, dirty: $dirty"
    echo "- mode: $( ((quick)) && echo quick || echo full), budget ${budget}s, total $(($(date +%s) - suite_start))s"
    echo
    echo "| step | status | seconds | timeout | notes |"
    echo "|---|---|---|---|---|"
    for name in "${STEPS[@]}"; do
        kind=$( ((REQUIRED[$name])) && echo "" || echo " (advisory)")
        echo "| $name$kind | ${STATUS[$name]} | ${SECONDS_TAKEN[$name]} | ${TIMEOUT[$name]} | ${NOTE[$name]//|/\\|} |"
    done
    echo
    echo "Logs: logs/STEP.log; environment: environment.md, nvidia-smi.txt."
    echo
    echo "## Key numbers"
    echo "$key_numbers"
} >"$out/SUMMARY.md"
cat "$out/SUMMARY.md"

if [[ -n $tar_path ]]; then
    if tar -czf "$tar_path" -C "$(dirname "$out")" "$(basename "$out")"; then
        echo "gpu_suite: packed $out into $tar_path ($(du -h "$tar_path" | cut -f 1))"
    else
        echo "gpu_suite: could not pack $out into $tar_path" >&2
        failed=1
    fi
fi
exit "$failed"
