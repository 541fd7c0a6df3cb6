#!/bin/bash
# Submit the extraction array and the merge that waits for all of its tasks to succeed.
# Environment (VIDEOS, CACHE, BACKBONES) passes through to both jobs.
set -euo pipefail
here=$(dirname "$0")
array=$(sbatch --parsable --export=ALL "$here/extract_array.sbatch" "$@")
merge=$(sbatch --parsable --export=ALL --dependency="afterok:${array%%;*}" "$here/merge.sbatch")
echo "extraction array $array, merge $merge (runs once every shard has succeeded)"
