#!/usr/bin/env bash
# Train the ToyWorld teacher stage by stage (about 70 minutes on 2 CPU cores), then copy the result to
# checkpoints/toyworld-teacher. TOYWORLD_OUT (default outputs/toyworld) holds the intermediate stages.
set -euo pipefail
cd "$(dirname "$0")/../.."
for stage in vision symbolic relations align qa; do
  python -m trainer fit --config "configs/toyworld/teacher_${stage}.yaml" "$@"
done
