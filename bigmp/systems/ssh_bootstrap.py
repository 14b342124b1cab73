"""The first thing a remote host runs: ``python3 -c <this file> '<json header>'``.

It must work with nothing of bigmp on the host, so it uses the standard library only.
It answers one JSON line (Python version, CPUs, missing compiled dependencies, whether the
code bundle is cached), receives the bundle if asked for, then becomes the worker on the
same stdin/stdout/stderr. It reads stdin unbuffered, so no byte meant for the worker is lost.
"""
import importlib.util
import json
import os
import sys


def _read_exact(n):
    parts, left = [], n
    while left:
        chunk = os.read(0, min(left, 1 << 20))
        if not chunk:
            raise SystemExit("bigmp bootstrap: stdin closed during the code upload")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def _read_line():
    out = bytearray()
    while not out.endswith(b"\n"):
        b = os.read(0, 1)
        if not b:
            break
        out += b
    return bytes(out)


def main():
    h = json.loads(sys.argv[1])
    cache = os.path.expanduser(h["cache"])
    code = os.path.join(cache, "code-" + h["hash"])
    missing = [m for m in h["requires"] if importlib.util.find_spec(m) is None]
    need = not os.path.isdir(code)
    reply = {"python": sys.version.split()[0], "cpus": os.cpu_count(), "missing": missing,
             "need_code": need, "pid": os.getpid(), "executable": sys.executable}
    os.write(1, (json.dumps(reply) + "\n").encode())
    if "%d.%d" % sys.version_info[:2] != h["python"] or missing:
        sys.exit(3)
    if need:
        # Only a first start on a host needs these: the reply above does not wait for them.
        import hashlib
        import io
        import shutil
        import tempfile
        import zipfile
        data = _read_exact(int(_read_line()))
        if hashlib.sha256(data).hexdigest() != h["hash"]:
            sys.exit("bigmp bootstrap: the code bundle arrived corrupted")
        os.makedirs(cache, mode=0o700, exist_ok=True)
        tmp = tempfile.mkdtemp(dir=cache, prefix=".tmp-")
        zipfile.ZipFile(io.BytesIO(data)).extractall(tmp)
        try:
            os.rename(tmp, code)
        except OSError:   # another machine of this host got there first
            shutil.rmtree(tmp, ignore_errors=True)
    sys.path.insert(0, code)
    os.environ["BIGMP_CODE_DIR"] = code
    from bigmp import worker
    worker.main()


if __name__ == "__main__":
    main()
