#!/usr/bin/env bash
# Builds the project image (Dockerfile) without a Docker engine or an image registry, runs one
# step of the daily pipeline from it with the network off, and records its size.
#
#   sudo pipelines/build_image.sh [TAG]          (default TAG: localhost/smlrec:0.1.0)
#
# Debian 12, as root. It
#   1. installs buildah, podman, runc and mmdebstrap with apt where they are missing;
#   2. makes the base, Debian bookworm (minbase) with python3 3.11 and python3-venv, with
#      mmdebstrap, and imports it as BASE_TAG (kept: set REBUILD_BASE=1 to make it again);
#   3. builds the Dockerfile on it with `buildah bud --isolation chroot` from a lean build
#      context (the files the Dockerfile copies, torch's CPU wheel from pip's find-links,
#      the CA bundle pip trusts); pip inside the build uses the host's index settings;
#   4. runs, with `podman run --network none`, the imports, `smlrec --help`, `smlrec data
#      synth` and validate_op exactly as pipelines/daily.yaml runs it (exec-validate-op);
#   5. writes benchmarks/results/image.md and image.json.
# Environment: BASE_TAG (localhost/smlrec-base:bookworm), REBUILD_BASE=1, DEBIAN_MIRROR
# (http://deb.debian.org/debian), STORAGE_DRIVER (containers/storage's driver: overlay here,
# vfs where overlay is refused), NICE (10: builds run under nice), RESULTS (benchmarks/results).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
TAG=${1:-localhost/smlrec:0.1.0}
BASE_TAG=${BASE_TAG:-localhost/smlrec-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SECURITY_MIRROR=${SECURITY_MIRROR:-${DEBIAN_MIRROR%/debian}/debian-security}
NICE=${NICE:-10}
RESULTS=${RESULTS:-$ROOT/benchmarks/results}
RUN_PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
# The OCI runtime may not raise limits here (no CAP_SYS_RESOURCE): ask for lower ones.
ULIMITS=(--ulimit "nofile=$(( $(ulimit -Hn) > 16385 ? 16384 : $(ulimit -Hn) / 2 ))"
         --ulimit "nproc=$(( $(ulimit -Hu) > 8193 ? 8192 : $(ulimit -Hu) / 2 ))")
# crun refuses hybrid cgroups (v1 with a v2 mount); runc does not.
RUNTIME=${RUNTIME:-runc}

log() { printf '== %s\n' "$*" >&2; }
[ "$(id -u)" = 0 ] || { echo "run as root (apt, mmdebstrap, containers/storage)" >&2; exit 1; }

# 1. Tools.
missing=()
for tool in buildah podman mmdebstrap runc; do
  command -v "$tool" >/dev/null || missing+=("$tool")
done
if [ ${#missing[@]} -gt 0 ]; then
  log "installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive nice -n "$NICE" apt-get install -y -qq \
    "${missing[@]}" uidmap >/dev/null
fi

WORK=$(mktemp -d /var/tmp/smlrec-image.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# 2. The base.
base_s=""
if [ "${REBUILD_BASE:-0}" = 1 ] || ! podman image exists "$BASE_TAG"; then
  log "making the base $BASE_TAG with mmdebstrap"
  t0=$(date +%s)
  nice -n "$NICE" mmdebstrap --quiet --variant=minbase \
    --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    bookworm "$WORK/base.tar" \
    "deb $DEBIAN_MIRROR bookworm main" "deb $DEBIAN_MIRROR bookworm-updates main" \
    "deb $SECURITY_MIRROR bookworm-security main"
  podman import --quiet --change "ENV PATH=$RUN_PATH" --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' "$WORK/base.tar" "$BASE_TAG" >/dev/null
  rm -f "$WORK/base.tar"
  base_s=$(( $(date +%s) - t0 ))
fi

# 3. The build context: what the Dockerfile copies (tracked and new files, no caches), the
# torch CPU wheel pip's find-links hold, and the CA bundle pip trusts.
pip_conf() {  # the value pip uses for KEY, from its environment or its config files
  python3 -m pip config list 2>/dev/null \
    | sed -nE "s/^(:env:|global|install)\.$1='(.*)'$/\2/p" | awk 'NR == 1' || true
}
CTX=$WORK/context
mkdir -p "$CTX/wheels"
git ls-files -z --cached --others --exclude-standard -- Dockerfile pyproject.toml README.md \
    smlrec components adapters pipelines serving feature_repo configs \
  | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done \
  | tar --null -T - -cf - | tar -xf - -C "$CTX"
torch_pin=$(grep -m1 -oE 'torch==[0-9.]+' pyproject.toml)
torch_version=${torch_pin#torch==}
wheel=""
for dir in ${PIP_FIND_LINKS:-} $(pip_conf find-links); do
  for f in "$dir"/torch-"$torch_version"+cpu-cp311-cp311-*linux*_"$(uname -m)".whl; do
    [ -f "$f" ] && { wheel=$f; break 2; }
  done
done
build_args=(--build-arg "BASE=$BASE_TAG")
if [ -n "$wheel" ]; then
  ln "$wheel" "$CTX/wheels/" 2>/dev/null || cp "$wheel" "$CTX/wheels/"
  build_args+=(--build-arg TORCH_WHEELS=wheels)
else
  log "no torch $torch_version CPU wheel in pip's find-links: the CPU index instead"
  build_args+=(--build-arg TORCH_INDEX=https://download.pytorch.org/whl/cpu)
fi
cert=${PIP_CERT:-$(pip_conf cert)}
if [ -n "$cert" ] && [ -f "$cert" ]; then
  cp "$cert" "$CTX/pip-ca.crt"
  build_args+=(--build-arg PIP_CERT=/tmp/context/pip-ca.crt)
fi
index=${PIP_INDEX_URL:-$(pip_conf index-url)}
case "$index" in http*) build_args+=(--build-arg "PIP_INDEX_URL=$index") ;; esac
# Only the indexes a container can reach (file:// folders of this machine are left out).
extra=$(for u in ${PIP_EXTRA_INDEX_URL:-} $(pip_conf extra-index-url); do
          case "$u" in http*) printf '%s ' "$u" ;; esac; done)
[ -n "$extra" ] && build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=${extra% }")
trusted=${PIP_TRUSTED_HOST:-$(pip_conf trusted-host)}
[ -n "$trusted" ] && build_args+=(--build-arg "PIP_TRUSTED_HOST=$trusted")

log "building $TAG on $BASE_TAG (buildah bud --isolation chroot)"
t0=$(date +%s)
nice -n "$NICE" buildah bud --isolation chroot --layers "${ULIMITS[@]}" "${build_args[@]}" \
  -f "$CTX/Dockerfile" -t "$TAG" "$CTX" 2>&1 | tee "$WORK/build.log" \
  | grep --line-buffered -E '^(STEP|COMMIT|Successfully)|rror' >&2
build_s=$(( $(date +%s) - t0 ))

# 4. One step of the daily pipeline, from the image, with no network.
mkdir -p "$WORK/check"
cat > "$WORK/check/check.sh" <<'CHECK'
set -eu
W=$1
python - <<'PY'
import socket
try:
    socket.create_connection(("pypi.org", 443), timeout=3).close()
    print("network: ON (pypi.org:443 reachable)")
except OSError as exc:
    print(f"network: off ({type(exc).__name__}: {exc})")
PY
python -c "import sys, smlrec, components.ops, torch, feast, great_expectations, bentoml, kfp; print('python', sys.version.split()[0], '| torch', torch.__version__, '| cuda', torch.cuda.is_available(), '| kfp', kfp.__version__, '| feast', feast.__version__, '| great_expectations', great_expectations.__version__, '| bentoml', bentoml.__version__)"
echo "venv: $(du -sm /opt/venv | cut -f1) MB; largest packages (MB):"
du -sm /opt/venv/lib/python3.11/site-packages/* | sort -rn | head -8 | awk '{sub(".*/", "", $2); printf "  %s %s\n", $1, $2}'
echo "\$ smlrec --help"
smlrec --help
echo "\$ smlrec data synth --out $W/data --users 300 --items 150 --periods 4 --per-period 3000"
smlrec data synth --out "$W/data" --users 300 --items 150 --periods 4 --per-period 3000 --seed 0
python - "$W" <<'PY'
import json, os, subprocess, sys, yaml
w = sys.argv[1]
spec = yaml.safe_load(open("pipelines/daily.yaml"))
ex = spec["deploymentSpec"]["executors"]["exec-validate-op"]["container"]
period = sorted(p.split("=", 1)[1] for p in os.listdir(f"{w}/data/interactions"))[-1]
out = f"{w}/out"
os.makedirs(out, exist_ok=True)
executor_input = {
    "inputs": {"parameterValues": {"period": period, "data_uri": f"{w}/data", "input_file": "",
                                   "period_spec": "1D", "min_rows": 1, "max_rows": 1000000}},
    "outputs": {
        "parameters": {"rows": {"outputFile": f"{out}/rows"}},
        "artifacts": {"report": {"artifacts": [{"name": "report", "uri": f"{out}/report.md",
                                                "type": {"schemaTitle": "system.Markdown"},
                                                "metadata": {}}]}},
        "outputFile": f"{out}/executor_output.json"}}
argv = [a.replace("{{$}}", json.dumps(executor_input)) for a in ex["command"] + ex["args"]]
print(f"$ validate_op: the command and args of exec-validate-op (pipelines/daily.yaml), "
      f"period {period}", flush=True)
proc = subprocess.run(argv, capture_output=True, text=True)
with open(f"{out}/executor.log", "w") as fh:
    fh.write(proc.stdout + proc.stderr)
lines = [line for line in (proc.stdout + proc.stderr).splitlines()
         if "Skipping registering function" not in line]
print("(executor log: last lines, without its registration messages)")
print("\n".join(lines[-6:]))
print("component exit code", proc.returncode)
if proc.returncode == 0:
    print("executor_output.json:", open(f"{out}/executor_output.json").read())
    print("report.md:")
    print("".join(open(f"{out}/report.md").readlines()[:14]))
sys.exit(proc.returncode)
PY
CHECK
log "running validate_op from $TAG with --network none"
t0=$(date +%s)
run_rc=0
run_how="podman run --runtime $RUNTIME --network none ${ULIMITS[*]} -v <check>:/check"
nice -n "$NICE" podman run --rm --runtime "$RUNTIME" --network none "${ULIMITS[@]}" \
  -v "$WORK/check:/check" "$TAG" sh /check/check.sh /check >"$WORK/run.log" 2>&1 || run_rc=$?
if [ "$run_rc" != 0 ] && grep -qE 'OCI|runc|crun' "$WORK/run.log"; then
  # No OCI runtime here: buildah's chroot isolation, in a new network namespace of our own.
  log "podman run failed ($(tail -1 "$WORK/run.log")); buildah run --isolation chroot instead"
  run_how="unshare --net buildah run --isolation chroot -v <check>:/check"
  ctr=$(buildah from --quiet "$TAG")
  run_rc=0
  nice -n "$NICE" unshare --net buildah run --isolation chroot -v "$WORK/check:/check" "$ctr" \
    sh /check/check.sh /check >"$WORK/run.log" 2>&1 || run_rc=$?
  buildah rm "$ctr" >/dev/null
fi
run_s=$(( $(date +%s) - t0 ))
cat "$WORK/run.log" >&2

# 5. Results.
mkdir -p "$RESULTS"
podman image inspect "$TAG" >"$WORK/inspect.json"
podman image inspect "$BASE_TAG" >"$WORK/base-inspect.json"
podman history --format json "$TAG" >"$WORK/history.json"
{
  echo "buildah=$(buildah --version)"
  echo "podman=$(podman --version)"
  echo "mmdebstrap=$(mmdebstrap --version)"
  echo "runc=$(runc --version | head -1)"
  echo "kernel=$(uname -sr)"
  echo "storage_driver=$(podman info --format '{{.Store.GraphDriverName}}')"
  echo "storage_du=$(du -sh /var/lib/containers/storage 2>/dev/null | cut -f1)"
} >"$WORK/versions.txt"
python3 - "$WORK" "$RESULTS" "$TAG" "$BASE_TAG" "$build_s" "${base_s:-}" "$run_s" "$run_rc" \
    "$run_how" "${wheel:-}" <<'PY'
import datetime, json, re, sys
work, results, tag, base_tag, build_s, base_s, run_s, run_rc, run_how, wheel = sys.argv[1:]
inspect = json.load(open(f"{work}/inspect.json"))[0]
base = json.load(open(f"{work}/base-inspect.json"))[0]
history = json.load(open(f"{work}/history.json"))
versions = dict(line.rstrip("\n").split("=", 1) for line in open(f"{work}/versions.txt"))
run_log = open(f"{work}/run.log").read()
mb = lambda b: round(b / 1e6, 1)
def step(h):
    text = re.sub(r"\s+", " ", h.get("CreatedBy") or h.get("comment") or "")
    text = re.sub(r"^\|\d+ .*?/bin/sh -c (--mount\S+ )?", "RUN ", text)
    text = re.sub(r"^/bin/sh -c #\(nop\) ", "", text)
    text = re.sub(r"^(COPY|ADD) (dir|file|multi):[0-9a-f]{64} in ", r"\1 ... in ", text)
    return re.sub(r"^/bin/sh -c ", "RUN ", text).strip()[:150]
layers = [{"size_bytes": h.get("size", 0), "size_mb": mb(h.get("size", 0)),
           "created_by": step(h)} for h in history]
cached = open(f"{work}/build.log").read().count("Using cache")
result = {
    "date": datetime.date.today().isoformat(),
    "image": tag, "image_id": inspect["Id"][:12],
    "size_bytes": inspect["Size"], "size_mb": mb(inspect["Size"]),
    "base": {"image": base_tag, "size_mb": mb(base["Size"]),
             "made_with": "mmdebstrap --variant=minbase bookworm, python3 python3-venv "
                          "ca-certificates, docs/man/locales excluded; podman import"},
    "layers": layers,
    "build_seconds": int(build_s), "build_steps_from_cache": cached,
    "base_seconds": int(base_s) if base_s else None,
    "build_command": "buildah bud --isolation chroot --layers (BASE, TORCH_WHEELS, PIP_* "
                     "build args)",
    "torch_wheel": wheel.rsplit("/", 1)[-1] or None,
    "run": {"how": run_how, "exit_code": int(run_rc), "seconds": int(run_s),
            "network": next((l for l in run_log.splitlines() if l.startswith("network:")), ""),
            "versions": next((l for l in run_log.splitlines() if l.startswith("python ")), ""),
            "validate_rows": (json.loads(m.group(1))["parameterValues"]["rows"]
                              if (m := re.search(r"executor_output.json: (\{.*\})", run_log))
                              else None)},
    "tools": versions,
}
json.dump(result, open(f"{results}/image.json", "w"), indent=2)
open(f"{results}/image.json", "a").write("\n")
rows = "\n".join(f"| {l['size_mb']:,} | `{l['created_by'].replace('|', '/')}` |"
                 for l in layers if l["size_bytes"] > 0)
empty = sum(1 for l in layers if l["size_bytes"] <= 0)
md = f"""# The project image, built without a Docker engine

`pipelines/build_image.sh` ({result['date']}): the Dockerfile built with buildah on a Debian
bookworm base made with mmdebstrap (no image registry is reachable here, so python:3.11-slim
cannot be pulled), then one step of the daily pipeline run from the image with the network off.

| | |
|---|---|
| Image | `{tag}` ({result['image_id']}) |
| Size (uncompressed, `podman image inspect`) | **{result['size_mb']:,} MB** |
| Base `{base_tag}` | {result['base']['size_mb']:,} MB |
| Build time (`buildah bud`) | {build_s} s{f", {cached} steps from cache" if cached else ""}{f" (base: {base_s} s more)" if base_s else " (base reused)"} |
| torch | {result['torch_wheel'] or 'from the index'} |
| Step run | {run_how}: exit code {run_rc}, {run_s} s |
| Tools | {versions['buildah']}; {versions['podman']}; {versions['mmdebstrap']}; {versions['runc']}; storage driver {versions['storage_driver']}; {versions['kernel']} |
| /var/lib/containers/storage | {versions['storage_du']} |

## Layers (newest first, `podman history`; {empty} more of 0 MB: ENV, ARG, WORKDIR...)

| MB | Created by |
|---:|---|
{rows}

## What the step printed

```
{run_log.strip()}
```

## How it was built here, and what did not work

No Docker engine and no image registry: the base is Debian bookworm from Debian's package
mirror (`mmdebstrap --variant=minbase`, python3 3.11.2, python3-venv, ca-certificates;
docs, man pages and locales left out), imported with `podman import`. The image's Python is
a venv at /opt/venv (the Dockerfile makes one on any base; Debian's python3 refuses pip
installs, PEP 668). Containers' storage: the kernel's overlay driver worked, vfs was not needed.

- Build: `buildah bud --isolation chroot` runs the RUN steps without an OCI runtime. With the
  default isolation (crun) a RUN step fails: `crun: cgroups in hybrid mode not supported,
  drop all controllers from cgroupv2` (cgroup v1 controllers with a v2 mount); with
  `--runtime runc` and lowered `--ulimit`s it works too.
- pip inside the build: chroot isolation shares the host's network, so pip reaches the same
  PyPI mirror as the host; the CA bundle pip trusts is put in the build context and named by
  `--build-arg PIP_CERT` (the context is bind-mounted at /tmp/context only while pip runs).
  Volumes (`buildah bud -v` for a pip.conf) were tried first: they leave empty mount-point
  files in the image. torch is the CPU wheel from pip's find-links (hard-linked into the
  context, `--build-arg TORCH_WHEELS=wheels`), so no CUDA build is downloaded.
- Run: `podman run` with crun fails at once: `crun: setrlimit RLIMIT_NOFILE: Operation not
  permitted` (the process has no CAP_SYS_RESOURCE; podman's default limits, `--ulimit host`
  and limits equal to the hard ones all fail on a setrlimit), then, with lower limits, the
  hybrid-cgroups error above, also with `--cgroups=disabled`. runc (Debian's 1.1.5) runs it
  with `--ulimit`s below the hard limits (`error setting rlimit type 7` / `type 6` otherwise).
  `--network none`: only a loopback interface, and the step's own probe of pypi.org:443 fails.
"""
open(f"{results}/image.md", "w").write(md)
PY
log "wrote $RESULTS/image.md and image.json"
exit "$run_rc"
