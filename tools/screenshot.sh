#!/usr/bin/env bash
# Screenshot an HTML page (e.g. the tree viewer's) in headless Chromium.
#   tools/screenshot.sh page.html out.png [width height]      (default 1600 x 1000)
# A URL fragment selects a node in the viewer:  tools/screenshot.sh 'tree.html#node=7' out.png
# Needs Chromium (Debian: apt-get install -y chromium). Set CHROMIUM=/path/to/binary to use another build.
set -euo pipefail
if [[ $# -lt 2 || $# -gt 4 ]]; then
  echo "usage: $0 page.html[#fragment] out.png [width height]" >&2
  exit 2
fi
page=$1 out=$2 width=${3:-1600} height=${4:-1000}
file=${page%%#*}
frag=""
[[ "$page" == *"#"* ]] && frag="#${page#*#}"
if [[ ! -f "$file" ]]; then
  echo "screenshot.sh: error: no such file: $file" >&2
  exit 2
fi
browser=${CHROMIUM:-}
if [[ -z "$browser" ]]; then
  for b in chromium chromium-browser google-chrome-stable google-chrome; do
    if command -v "$b" >/dev/null 2>&1; then browser=$(command -v "$b"); break; fi
  done
fi
if [[ -z "$browser" ]]; then
  echo "screenshot.sh: error: Chromium not found; install it (Debian: apt-get update && apt-get install -y chromium)" \
       "or set CHROMIUM=/path/to/chrome" >&2
  exit 2
fi
url="file://$(cd "$(dirname "$file")" && pwd)/$(basename "$file")$frag"
profile=$(mktemp -d)
trap 'rm -rf "$profile"' EXIT
mkdir -p "$(dirname "$out")"
# --virtual-time-budget lets the page's script run (fit, preselect) before the capture.
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --no-first-run --disable-extensions \
  --user-data-dir="$profile" --force-device-scale-factor="${SCALE:-1}" --window-size="$width,$height" \
  --virtual-time-budget=3000 --screenshot="$out" "$url" >/dev/null 2>"$profile/log" || {
  echo "screenshot.sh: error: $browser failed:" >&2; tail -5 "$profile/log" >&2; exit 1; }
[[ -s "$out" ]] || { echo "screenshot.sh: error: no screenshot written" >&2; tail -5 "$profile/log" >&2; exit 1; }
echo "wrote $out (${width}x${height})"
