"""Translates csrc/cuda/*.cu, read as they are, into C++ that runs on the CPU with cuda_emu.h,
and builds it with torch.utils.cpp_extension.load.

Every rewrite is checked: a pattern the translator expects but does not find raises
TranslationError, so that a change to the CUDA sources cannot make the harness silently test
nothing. The translated files keep the original line numbering (a `#line` directive names the
original file), so compiler messages and the emulator's error reports point into csrc/cuda/.

Rewrites:
  * the CUDA-only includes (ATen/cuda/CUDAContext.h, c10/cuda/CUDAException.h,
    c10/cuda/CUDAGuard.h) -> cuda_emu.h; the project's own headers ("../x.h" for csrc/x.h,
    "x.cuh" for csrc/cuda/x.cuh) -> their translated copies, csrc/... under the output folder
    (a header's own relative includes then find the translated copies too). A .cuh header gets
    the rewrites of a .cu file (less the registration); a csrc/*.h header (host code shared
    with the CPU kernels) only the at::empty one;
  * kernel<<<grid, block, smem, stream>>>(args) -> ::cuda_emu::launch("kernel", kernel, grid,
    block, smem, stream, args);
  * each `__shared__ T name[...]` declaration gets `::cuda_emu::shared_poison(&name, ...)`
    after it (garbage at every block start, as on a GPU);
  * at::empty( -> ::cuda_emu::garbage_empty( (CUDA memory is not zeroed either);
  * the prefetch.global.L2 inline asm -> ::cuda_emu::prefetch_l2(address);
  * TORCH_LIBRARY_IMPL(mf_ext, CUDA, m) -> TORCH_LIBRARY_IMPL(<namespace>, CPU, m); the schemas
    of <namespace> are those of csrc/mf_ext.cpp, extracted from it at build time.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
CSRC = REPO / "csrc"
SOURCES = ("masked_mf_loss.cu", "observed_mf_loss.cu")
NAMESPACE = "mf_ext_emu"
CUDA_INCLUDES = ("ATen/cuda/CUDAContext.h", "c10/cuda/CUDAException.h", "c10/cuda/CUDAGuard.h")


class TranslationError(RuntimeError):
    pass


def _expect(cond, what):
    if not cond:
        raise TranslationError(f"CUDA emulation translator: {what}")


def _match_forward(text, start, open_ch, close_ch):
    """Index just past the bracket that closes text[start] (== open_ch)."""
    _expect(text[start] == open_ch, f"expected {open_ch!r} at offset {start}")
    depth = 0
    for k in range(start, len(text)):
        if text[k] == open_ch:
            depth += 1
        elif text[k] == close_ch:
            depth -= 1
            if depth == 0:
                return k + 1
    raise TranslationError(f"CUDA emulation translator: unbalanced {open_ch!r} at {start}")


def _split_top_level(text):
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch in "([{<":
            depth += 1
        elif ch in ")]}>":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if cur.strip():
        parts.append(cur.strip())
    return parts


def rewrite_launches(src):
    """kernel<targs><<<cfg>>>(args) -> ::cuda_emu::launch(...); returns (text, count)."""
    out, pos, count = [], 0, 0
    while True:
        k = src.find("<<<", pos)
        if k < 0:
            break
        # The kernel expression: an identifier, optionally followed by <template args>.
        e = k
        if src[e - 1] == ">":
            depth = 0
            while True:
                e -= 1
                if src[e] == ">":
                    depth += 1
                elif src[e] == "<":
                    depth -= 1
                    if depth == 0:
                        break
        s = e
        while s > 0 and (src[s - 1].isalnum() or src[s - 1] in "_:"):
            s -= 1
        kernel = src[s:k]
        _expect(re.fullmatch(r"[A-Za-z_][\w:]*(<[^;{}]*>)?", kernel),
                f"cannot parse the kernel of a launch: {kernel!r}")
        end_cfg = src.find(">>>", k)
        _expect(end_cfg > 0, "<<< without >>>")
        cfg = _split_top_level(src[k + 3:end_cfg])
        _expect(2 <= len(cfg) <= 4, f"launch configuration of {kernel}: {cfg}")
        cfg += ["0", "nullptr"][len(cfg) - 2:]
        p = end_cfg + 3
        while src[p].isspace():
            p += 1
        close = _match_forward(src, p, "(", ")")
        args = src[p + 1:close - 1]
        name = re.sub(r"\s+", " ", kernel)
        call = (f'::cuda_emu::launch("{name}", {kernel}, dim3({cfg[0]}), dim3({cfg[1]}), '
                f"{cfg[2]}, {cfg[3]}" + (f", {args}" if args.strip() else "") + ")")
        out.append(src[pos:s])
        out.append(call)
        pos = close
        count += 1
    out.append(src[pos:])
    return "".join(out), count


SHARED_RE = re.compile(
    r"__shared__\s+(?:__align__\(\d+\)\s+)?(?:(?:unsigned|signed|long|short)\s+)*[\w:]+"
    r"(?:<[^;>]*>)?\s+(\w+)\s*(?:\[[^\]]+\]\s*)*;")


# Every CUDA built-in cuda_emu.h provides. A source that uses another one fails translation
# with its name (rather than with a compiler error, or worse, a host function of that name).
EMULATED = {
    "__global__", "__device__", "__host__", "__forceinline__", "__launch_bounds__", "__align__",
    "__restrict__", "__shared__", "__syncthreads", "__syncwarp", "__shfl_xor_sync",
    "__shfl_down_sync", "__trap", "atomicAdd", "atomicMin", "threadIdx", "blockIdx",
    "blockDim", "gridDim", "make_float4", "make_double2", "float4", "double2", "dim3",
    "cudaStream_t", "cudaStreamIsCapturing", "cudaStreamCaptureStatus",
    "cudaStreamCaptureStatusNone", "__CUDA_ARCH__",
}


def _code_only(text):
    """text without comments and string literals."""
    text = re.sub(r"//[^\n]*", "", text)
    text = re.sub(r"/\*.*?\*/", "", text, flags=re.S)
    return re.sub(r'"(?:\\.|[^"\\])*"', '""', text)


def cuda_names(text):
    """The CUDA-looking identifiers a source uses: __x, __x__, atomicX, cudaX, xIdx/xDim,
    make_x4/x2, the vector types."""
    code = _code_only(text)
    pattern = (r"\b(__[A-Za-z_]+|atomic[A-Z]\w*|cuda[A-Z]\w*|(?:thread|block)Idx|"
               r"(?:block|grid)Dim|make_\w+[1-4]|(?:float|double|int|uint|char|uchar|short|"
               r"long|ushort|ulong|longlong|ulonglong)[1-4]|dim3)\b")
    return set(re.findall(pattern, code))


def translate(text, filename, namespace=NAMESPACE):
    """The translated source of one .cu file (text as read from `filename`)."""
    unknown = sorted(cuda_names(text) - EMULATED)
    _expect(not unknown, f"{filename} uses CUDA names the emulator lacks: {unknown}")
    src = text
    # Includes: the CUDA-only ones become the emulator (on the first one's line), blanks after.
    for i, inc in enumerate(CUDA_INCLUDES):
        line = f"#include <{inc}>"
        _expect(src.count(line) == 1, f"{filename}: expected one `{line}`")
        src = src.replace(line, f'#include "{HERE / "cuda_emu.h"}"' if i == 0 else
                          "// (CUDA include removed by the emulation translator)")
    rel = re.findall(r'#include "\.\./([\w.]+)"', src)
    _expect(rel, f"{filename}: expected an include of a csrc/ header")
    for header in local_includes(text, CSRC / "cuda" / filename):
        _expect(header.is_file(), f"{filename}: {header} not found")
    # "../x.h" -> "csrc/x.h", "x.cuh" -> "csrc/cuda/x.cuh": the copies generate() translates.
    src = re.sub(r'#include "\.\./([\w.]+)"', r'#include "csrc/\1"', src)
    src = re.sub(r'#include "([\w.]+\.cuh)"', r'#include "csrc/cuda/\1"', src)
    _expect(not re.search(r"#include\s*<(cuda|cub|thrust|c10/cuda|ATen/cuda)", src),
            f"{filename}: a CUDA include the emulator does not replace")

    # The L2 prefetch hint (inline PTX).
    src, n = re.subn(r'asm\s+volatile\s*\(\s*"prefetch\.global\.L2 \[%0\];"\s*::\s*"l"\((.*?)\)\);',
                     r"::cuda_emu::prefetch_l2(\1);", src)
    _expect("prefetch.global" not in src, f"{filename}: an unparsed prefetch asm")
    _expect(not re.search(r"\basm\b", src), f"{filename}: inline asm the emulator does not know")

    # __shared__ declarations: garbage at the start of every block.
    declared = src.count("__shared__")
    src, n = SHARED_RE.subn(lambda m: m.group(0) + f" ::cuda_emu::shared_poison(&{m.group(1)}, "
                            f"sizeof({m.group(1)}));", src)
    _expect(n == declared and n > 0, f"{filename}: {declared} __shared__ declarations but "
            f"{n} parsed")

    # Launches.
    src, n = rewrite_launches(src)
    _expect(n > 0, f"{filename}: no kernel launch found")
    _expect("<<<" not in src and ">>>" not in src, f"{filename}: a launch was not rewritten")

    # Uninitialized device memory.
    n = src.count("at::empty(")
    _expect(n > 0, f"{filename}: no at::empty( to poison")
    src = src.replace("at::empty(", "::cuda_emu::garbage_empty(")

    # Registration under the emulator's namespace, CPU key.
    src, n = re.subn(r"TORCH_LIBRARY_IMPL\(mf_ext,\s*CUDA,\s*m\)",
                     f"TORCH_LIBRARY_IMPL({namespace}, CPU, m)", src)
    _expect(n == 1, f"{filename}: expected one TORCH_LIBRARY_IMPL(mf_ext, CUDA, m), found {n}")

    _expect(src.count("\n") == text.count("\n"), f"{filename}: line numbering changed")
    return f'#line 1 "{CSRC / "cuda" / filename}"\n' + src


def local_includes(text, path):
    """The project headers that `text` (the file at `path`) includes with quotes."""
    return [(path.parent / name).resolve() for name in re.findall(r'#include "([\w./]+)"', text)]


def translate_header(text, path):
    """The translated copy of a project header included by the CUDA sources: a csrc/cuda/*.cuh
    gets the rewrites of a .cu file but the registration (and need not contain any); a csrc/*.h
    (host code, also compiled into the CPU kernels) only at::empty -> garbage_empty."""
    name = str(path.relative_to(CSRC))
    src = text
    if path.suffix == ".cuh":
        unknown = sorted(cuda_names(text) - EMULATED)
        _expect(not unknown, f"{name} uses CUDA names the emulator lacks: {unknown}")
        first = True
        for inc in CUDA_INCLUDES:
            line = f"#include <{inc}>"
            if line in src:
                src = src.replace(line, f'#include "{HERE / "cuda_emu.h"}"' if first else
                                  "// (CUDA include removed by the emulation translator)")
                first = False
        _expect(not re.search(r"\basm\b", src), f"{name}: inline asm the emulator does not know")
        declared = src.count("__shared__")
        src, n = SHARED_RE.subn(lambda m: m.group(0) + f" ::cuda_emu::shared_poison("
                                f"&{m.group(1)}, sizeof({m.group(1)}));", src)
        _expect(n == declared, f"{name}: {declared} __shared__ declarations but {n} parsed")
        src, _ = rewrite_launches(src)
        _expect("<<<" not in src and ">>>" not in src, f"{name}: a launch was not rewritten")
    else:
        _expect("__shared__" not in src and "<<<" not in src,
                f"{name}: device code in a host header")
    _expect(not re.search(r"#include\s*<(cuda|cub|thrust|c10/cuda|ATen/cuda)", src),
            f"{name}: a CUDA include the emulator does not replace")
    src = src.replace("at::empty(", "::cuda_emu::garbage_empty(")
    _expect(src.count("\n") == text.count("\n"), f"{name}: line numbering changed")
    return f'#line 1 "{path}"\n' + src


def registered_ops(cu_text):
    return re.findall(r'm\.impl\("(\w+)"', cu_text)


def schema_source(namespaces):
    """TORCH_LIBRARY blocks for `namespaces`, with the body of csrc/mf_ext.cpp's
    TORCH_LIBRARY(mf_ext, m) verbatim."""
    text = (CSRC / "mf_ext.cpp").read_text()
    m = re.search(r"TORCH_LIBRARY\(mf_ext,\s*m\)\s*\{", text)
    _expect(m, "csrc/mf_ext.cpp: no TORCH_LIBRARY(mf_ext, m) block")
    close = _match_forward(text, m.end() - 1, "{", "}")
    body = text[m.end():close - 1]
    _expect(body.count("m.def(") >= 2, "csrc/mf_ext.cpp: expected the op schemas")
    out = ["// Generated by tests/cuda_emulation/translate.py from csrc/mf_ext.cpp.",
           "#include <torch/library.h>"]
    for ns in namespaces:
        out.append(f"TORCH_LIBRARY({ns}, m) {{{body}}}")
    return "\n".join(out) + "\n", body


def _write_if_changed(path, text):
    """Atomic (xdist workers may translate at the same time); untouched when equal, so ninja
    keeps its objects."""
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def build_dir():
    """$MF_EXT_EMU_BUILD_DIR (built in place, incremental), else the cache: one folder per
    cache_key under ${XDG_CACHE_HOME:-~/.cache}/mf_ext/cuda_emulation, shared by all clones."""
    override = os.environ.get("MF_EXT_EMU_BUILD_DIR")
    if override:
        return Path(override)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mf_ext" / \
        "cuda_emulation"


def generate(out_dir):
    """Writes the translated sources; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    # The project headers the sources include, directly or through other headers.
    pending = [h for name in SOURCES
               for h in local_includes((CSRC / "cuda" / name).read_text(), CSRC / "cuda" / name)]
    headers = set()
    while pending:
        header = pending.pop()
        if header in headers:
            continue
        _expect(header.is_file() and CSRC in header.parents,
                f"{header}: not a header under csrc/")
        headers.add(header)
        pending += local_includes(header.read_text(), header)
    for header in sorted(headers):
        copy = out_dir / "csrc" / header.relative_to(CSRC)
        copy.parent.mkdir(parents=True, exist_ok=True)
        _write_if_changed(copy, translate_header(header.read_text(), header))
    paths = []
    for name in SOURCES:
        text = (CSRC / "cuda" / name).read_text()
        path = out_dir / (name[:-3] + "_emu.cpp")
        _write_if_changed(path, translate(text, name))
        paths.append(path)
    schemas, body = schema_source([NAMESPACE])
    for name in SOURCES:
        for op in registered_ops((CSRC / "cuda" / name).read_text()):
            _expect(f'"{op}(' in body, f"{name} registers {op}, which csrc/mf_ext.cpp lacks")
    spath = out_dir / "schemas.cpp"
    _write_if_changed(spath, schemas)
    paths.append(spath)
    selftest = SHARED_RE.sub(lambda m: m.group(0) + f" ::cuda_emu::shared_poison("
                             f"&{m.group(1)}, sizeof({m.group(1)}));",
                             (HERE / "selftest.cpp").read_text())
    selftest, n = rewrite_launches(selftest)
    _expect(n > 0, "selftest.cpp: no launch")
    tpath = out_dir / "selftest_emu.cpp"
    _write_if_changed(tpath, f'#line 1 "{HERE / "selftest.cpp"}"\n' + selftest)
    paths.append(tpath)
    return paths


def cache_key(sources, flags):
    """A digest of everything the library depends on: the translated sources, the headers they
    include (csrc/, cuda_emu.h), the flags, torch, Python and the compiler. The clone's own path
    (in the sources' #include and #line directives) is left out, so clones share builds."""
    import torch
    from torch.utils.cpp_extension import get_cxx_compiler

    h = hashlib.sha256()
    headers = sorted(CSRC.rglob("*.h")) + sorted(CSRC.rglob("*.cuh")) + [HERE / "cuda_emu.h"]
    for path in [*sources, *headers]:
        text = path.read_bytes().replace(str(REPO).encode(), b"<repo>")
        h.update(f"{path.name}\0".encode() + text + b"\0")
    compiler = subprocess.run([get_cxx_compiler(), "--version"], capture_output=True, text=True)
    for part in (" ".join(flags).replace(str(REPO), "<repo>"), torch.__version__, sys.version,
                 compiler.stdout):
        h.update(f"{part}\0".encode())
    return h.hexdigest()[:20]


def load(verbose=False):
    """Translates, then loads the library (ops torch.ops.mf_ext_emu.*) from the cache (built on
    a miss, under a lock per key, in a private folder renamed into place: see the README)."""
    import torch
    from torch.utils.cpp_extension import load as cpp_load

    # AT_PER_OPERATOR_HEADERS as setup.py: ATen/ATen.h is an error in the sources (light headers).
    flags = ["-O2", "-fno-strict-aliasing", "-DAT_PER_OPERATOR_HEADERS", f"-I{HERE}"]
    ldflags = []
    if os.environ.get("MF_EXT_EMU_ASAN"):  # needs LD_PRELOAD of libasan and libstdc++ (README)
        flags += ["-fsanitize=address", "-fno-omit-frame-pointer"]
        ldflags += ["-fsanitize=address"]
    # Named without the clone's path (in -I), as cache_key does, so that clones share the build.
    flags_text = " ".join(flags).replace(str(REPO), "<repo>")
    name = f"mf_ext_cuda_emu_{hashlib.sha1(flags_text.encode()).hexdigest()[:8]}"

    def build(out_dir, sources):
        cpp_load(name=name, sources=[str(p) for p in sources], extra_cflags=flags,
                 extra_ldflags=ldflags, build_directory=str(out_dir), is_python_module=False,
                 verbose=verbose)

    root = build_dir()
    if os.environ.get("MF_EXT_EMU_BUILD_DIR"):
        build(root, generate(root))
        return
    root.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix="build-", dir=root))
    try:
        sources = generate(scratch)
        final = root / cache_key(sources, flags + ldflags)
        library = final / f"{name}.so"
        if not library.exists():
            with open(root / f"{final.name}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes or we die
                if not library.exists():
                    build(scratch, sources)  # also loads it
                    shutil.rmtree(final, ignore_errors=True)  # a damaged entry
                    os.rename(scratch, final)
                    return
        torch.ops.load_library(str(library))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
