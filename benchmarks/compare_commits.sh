#!/usr/bin/env bash
# Times this checkout against an earlier commit on the same machine, alternately, each
# benchmark in its own process: benchmarks/bench.py (256 + 32, target mode under the exact rules
# and AttnLRP; this checkout's script, public API only, against both packages) and
# benchmarks/long_documents.py --cases smollm2-8000 --rules attnlrp (each commit's own script).
#   benchmarks/compare_commits.sh BASE [OUT]
# Needs the .venv of scripts/bootstrap.sh; writes the tables, with the date, both commits, the
# machine and each command, to OUT (default benchmarks/compare_<base>.md).
set -euo pipefail
cd "$(dirname "$0")/.."
base=$1
out=${2:-benchmarks/compare_${base}.md}
old=$(mktemp -d)/base
git worktree add -q --detach "$old" "$base"
trap 'git worktree remove --force "$old"' EXIT
py=.venv/bin/python
{
  echo "# $(git rev-parse --short HEAD) against $(git rev-parse --short "$base")"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'); $(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB;"\
       "torch $($py -c 'import torch; print(torch.__version__)'),"\
       "transformers $($py -c 'import transformers; print(transformers.__version__)')"
  for round in 1 2; do
    for which in base head; do
      src=$([ "$which" = base ] && echo "$old/src" || echo "$PWD/src")
      where=$($py -c "import sys; sys.path.insert(0, '$src'); import llama_attrib; print(llama_attrib.__file__)")
      echo
      echo "## bench.py, $which (round $round; $where)"
      echo
      echo "\`PYTHONPATH=$src $py benchmarks/bench.py --shapes issue6,smollm2 --prompts 256+32 --modes target,target-attnlrp\`"
      echo
      PYTHONPATH=$src $py benchmarks/bench.py --shapes issue6,smollm2 --prompts 256+32 \
        --modes target,target-attnlrp 2>/dev/null | grep '^|'
    done
  done
  for which in base head; do
    root=$([ "$which" = base ] && echo "$old" || echo "$PWD")
    echo
    echo "## long_documents.py, $which"
    echo
    echo "\`PYTHONPATH=$root/src $py $root/benchmarks/long_documents.py --cases smollm2-8000 --rules attnlrp\`"
    echo
    PYTHONPATH=$root/src $py "$root/benchmarks/long_documents.py" --cases smollm2-8000 --rules attnlrp \
      2>/dev/null | grep '^|'
  done
} | tee "$out"
