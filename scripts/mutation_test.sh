#!/usr/bin/env bash
# Mutation testing of refseg's core modules with mutmut 3 (https://pypi.org/project/mutmut/).
# Slow, and not part of CI: run it by hand now and then, and read the survivors.
#
#   bash scripts/mutation_test.sh                      # every module below, smallest first
#   bash scripts/mutation_test.sh losses metrics       # only these modules
#   bash scripts/mutation_test.sh risclip_modeling 'refseg.models.risclip.modeling_risclip.x_*__mutmut_1'
#                                                      # one module, only the mutants matching the globs
#
# Each module runs on its own: the repository (without .git) is copied to
# $MUTATION_WORKDIR/<module>/, a [tool.mutmut] section naming that one file and its tests is
# appended to the copy's pyproject.toml, and `mutmut run` runs there. mutmut writes its mutated
# files only under that copy's mutants/ folder: the working tree is never touched. The copies stay
# behind, so a survivor can be inspected afterwards:
#
#   cd "$MUTATION_WORKDIR/losses" && mutmut show refseg.losses.x_bce_loss__mutmut_13
#
# Needs `pip install "mutmut>=3.8,<4"` (MUTMUT=/path/to/mutmut picks another binary) and refseg's
# test dependencies. Environment knobs: MUTATION_WORKDIR (default: a new /tmp/refseg-mutmut.XXXXXX),
# MUTMUT_MAX_CHILDREN (parallel mutant runs, default 1: one pytest at a time).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"

all_modules=(losses metrics augment fusion layers processing_utils
             risclip_heads risclip_modeling cris_heads cris_modeling risam_heads risam_modeling
             prompt_ris_heads prompt_ris_modeling prompts)

# spec MODULE: sets `target` (the file to mutate), `tests` (pytest's test selection), `pytest_extra`
# (arguments for every pytest run) and `skip_defs` (functions left unmutated, by the start of their
# `def` line); fails if the module is unknown.
spec() {
    target="" tests=() pytest_extra=() skip_defs=()
    case "$1" in
        losses) target=src/refseg/losses.py; tests=(tests/test_losses.py) ;;
        metrics)
            target=src/refseg/metrics/referring_iou/referring_iou.py; tests=(tests/test_metrics.py)
            # evaluate.Metric.__init__ appends to the docstrings of copies of `add`/`add_batch` made
            # from their code objects; mutmut's trampoline wrappers have none (TypeError), so these
            # two get `# pragma: no mutate block` in the scratch copy and stay as they are.
            skip_defs=("def add_batch(" "def add(") ;;
        augment) target=src/refseg/data/augment.py; tests=(tests/test_augment.py) ;;
        fusion) target=src/refseg/adapters/fusion.py; tests=(tests/test_adapters.py tests/test_risclip_initialization.py) ;;
        layers) target=src/refseg/adapters/layers.py; tests=(tests/test_adapters.py tests/test_risclip_initialization.py) ;;
        processing_utils)
            target=src/refseg/processing_utils.py
            tests=(tests/test_processing_utils.py tests/test_risclip_processing.py) ;;
        # A method's files are held to the method's own tests (tests/**/test_<method>*.py, the equation
        # references included) without the slow trained ones: a break of an equation must fail them.
        risclip_heads|cris_heads|risam_heads|prompt_ris_heads)
            method=${1%_heads}
            target=src/refseg/models/$method/modeling_${method}_heads.py
            method_tests "$method" ;;
        risclip_modeling|cris_modeling|risam_modeling|prompt_ris_modeling)
            method=${1%_modeling}
            target=src/refseg/models/$method/modeling_${method}.py
            method_tests "$method" ;;
        prompts)  # Prompt-RIS's Cross-Modal Prompting lives in the adapters package
            target=src/refseg/adapters/prompts.py
            method_tests prompt_ris; tests+=(tests/test_adapter_prompts.py) ;;
        *) return 1 ;;
    esac
}

# method_tests METHOD: `tests` = every tests/**/test_METHOD*.py of the repository and the presence heads' tests
# (tests/test_no_target_heads.py), `pytest_extra` = not slow,
# and not the remote-code export tests (they copy the module files into a Hub folder and refuse the mutant's
# `import mutmut`: they test the export, not the method, and fail on every mutant alike)
method_tests() {
    mapfile -t tests < <(cd "$repo" && find tests -name "test_$1*.py" | sort)
    tests+=(tests/test_no_target_heads.py)  # every method's presence head (generalized RIS) is tested there
    pytest_extra=(-m "not slow" -k "not remote_code")
}

toml_list() {  # arguments -> a TOML list of strings
    local out="" w
    for w in "$@"; do
        out+="${out:+, }\"$w\""
    done
    echo "[$out]"
}

modules=()
filters=()
for arg in "$@"; do
    if spec "$arg" >/dev/null; then
        modules+=("$arg")
    elif [[ "$arg" == refseg.* ]]; then
        filters+=("$arg")
    else
        echo "error: unknown module '$arg' (known: ${all_modules[*]})" >&2
        exit 2
    fi
done
[ "${#modules[@]}" -gt 0 ] || modules=("${all_modules[@]}")
if [ "${#filters[@]}" -gt 0 ] && [ "${#modules[@]}" -ne 1 ]; then
    echo "error: mutant globs need exactly one module" >&2
    exit 2
fi

mutmut_bin="${MUTMUT:-mutmut}"
if ! command -v "$mutmut_bin" >/dev/null 2>&1; then
    echo "error: mutmut not found; pip install \"mutmut>=3.8,<4\" (or set MUTMUT=/path/to/mutmut)" >&2
    exit 2
fi
"$mutmut_bin" --version

workdir="${MUTATION_WORKDIR:-$(mktemp -d /tmp/refseg-mutmut.XXXXXX)}"
mkdir -p "$workdir"
echo "scratch copies in $workdir"

export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}" HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

summary=()
failed=0
for module in "${modules[@]}"; do
    spec "$module"
    # tests written to kill this module's survivors join its selection
    [ -f "$repo/tests/test_mutation_kills_$module.py" ] && tests+=("tests/test_mutation_kills_$module.py")
    copy="$workdir/$module"
    rm -rf "$copy"
    mkdir -p "$copy"
    (cd "$repo" && tar --exclude=.git --exclude=mutants --exclude=__pycache__ --exclude=.pytest_cache -cf - .) \
        | tar -C "$copy" -xf -
    # Drop any [tool.mutmut] section of the copy (up to the next table) and append this module's.
    python3 - "$copy/pyproject.toml" <<'EOF'
import re, sys
path = sys.argv[1]
text = open(path, encoding="utf-8").read()
text = re.sub(r"(?ms)^\[tool\.mutmut\]\n.*?(?=^\[|\Z)", "", text)
open(path, "w", encoding="utf-8").write(text.rstrip("\n") + "\n")
EOF
    cat >>"$copy/pyproject.toml" <<EOF

[tool.mutmut]
source_paths = ["src/"]
only_mutate = ["$target"]
also_copy = ["scripts/"]
pytest_add_cli_args_test_selection = $(toml_list "${tests[@]}")
pytest_add_cli_args = $(toml_list -p no:cacheprovider ${pytest_extra[@]+"${pytest_extra[@]}"})
EOF
    if [ "${#skip_defs[@]}" -gt 0 ]; then
        python3 - "$copy/$target" "${skip_defs[@]}" <<'EOF'
import sys
path, prefixes = sys.argv[1], tuple(sys.argv[2:])
lines = open(path, encoding="utf-8").read().split("\n")
for i, line in enumerate(lines):
    if line.strip().startswith(prefixes) and line.rstrip().endswith(":"):
        lines[i] = line.rstrip() + "  # pragma: no mutate block"
open(path, "w", encoding="utf-8").write("\n".join(lines))
EOF
    fi
    echo
    echo "=== $module: mutating $target, tests: ${tests[*]}${pytest_extra[*]:+ (${pytest_extra[*]})}"
    start=$(date +%s)
    set +e
    (cd "$copy" && nice -n 19 "$mutmut_bin" run --max-children "${MUTMUT_MAX_CHILDREN:-1}" ${filters[@]+"${filters[@]}"}) \
        >"$copy/mutmut-run.log" 2>&1
    rc=$?
    set -e
    elapsed=$(( $(date +%s) - start ))
    if [ "$rc" != 0 ]; then
        echo "mutmut run failed (exit $rc), last lines of $copy/mutmut-run.log:" >&2
        tail -c 3000 "$copy/mutmut-run.log" | tr '\r' '\n' | tail -n 30 >&2
        summary+=("$module: mutmut failed (exit $rc) after ${elapsed}s")
        failed=1
        continue
    fi
    (cd "$copy" && "$mutmut_bin" results --all true) >"$copy/mutmut-results.txt"
    line=$(python3 - "$copy/mutmut-results.txt" "$module" "$elapsed" <<'EOF'
import collections, sys
path, module, elapsed = sys.argv[1:]
status = collections.Counter()
for row in open(path, encoding="utf-8"):
    if ": " in row:
        status[row.rsplit(": ", 1)[1].strip()] += 1
checked = sum(n for s, n in status.items() if s != "not checked")
other = {s: n for s, n in status.items() if s not in ("killed", "survived", "timeout", "not checked")}
print(f"{module}: {checked} mutants, {status['killed']} killed, {status['survived']} survived, "
      f"{status['timeout']} timeouts" + "".join(f", {n} {s}" for s, n in sorted(other.items()))
      + (f" ({status['not checked']} not run)" if status["not checked"] else "") + f", {elapsed}s")
EOF
)
    echo "$line"
    grep -E ': (survived|timeout|no tests|suspicious|segfault)$' "$copy/mutmut-results.txt" || true
    summary+=("$line")
done

echo
echo "=== summary (scratch copies in $workdir; cd there and run 'mutmut show <name>' for a diff)"
printf '%s\n' "${summary[@]}"
exit "$failed"  # survivors do not fail the script; a module mutmut could not run does
