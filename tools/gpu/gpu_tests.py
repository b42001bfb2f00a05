#!/usr/bin/env python3
"""The GPU tests of a build tree (ctest label `gpu`), made to run on another machine without
ctest's build tree: tools/gpu/pack.sh records them here, tools/gpu/run_all.sh runs them there.

  gpu_tests.py outputs BUILD_DIR
      Prints the build-tree files (relative paths) that the gpu tests' commands name, from the
      CTestTestfile.cmake files (ctest itself hides commands whose executable is not built yet):
      the targets pack.sh builds.
  gpu_tests.py manifest BUILD_DIR SOURCE_DIR OUT.json
      Reads `ctest --show-only=json-v1 -L gpu`, rewrites paths: files of the build tree become
      @PKG@/<path in the build tree> (listed under "files": pack.sh copies them), other paths
      below it (work folders) @WORK@/<path>, the source tree @SRC@/<path>, the MPI launcher
      @MPIRUN@. Prints the build-tree files the tests need (one per line).
  gpu_tests.py run MANIFEST.json PKG_DIR SOURCE_DIR WORK_DIR [--budget-s N] [--log FILE]
      Runs every test as ctest would: its command, environment and working directory, a timeout
      (its TIMEOUT, else 300 s, never past the budget), then PASS/FAIL/SKIP_REGULAR_EXPRESSION
      and SKIP_RETURN_CODE decide. Prints one line per test and "N passed, N failed, N skipped";
      exits 1 when any test failed.
"""
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time


def props_of(test):
    return {p["name"]: p["value"] for p in test.get("properties", [])}


def make_manifest(build_dir, source_dir, out_path):
    build_dir, source_dir = os.path.realpath(build_dir), os.path.realpath(source_dir)
    shown = subprocess.run(["ctest", "--test-dir", build_dir, "-L", "gpu", "--show-only=json-v1"],
                           check=True, capture_output=True, text=True).stdout
    mpiexec = {os.path.realpath(p) for p in (shutil.which("mpiexec"), shutil.which("mpirun")) if p}
    files = set()

    def relocate(arg):
        if not isinstance(arg, str) or not arg.startswith("/"):
            return arg
        real = os.path.realpath(arg)
        if real in mpiexec or os.path.basename(arg) in ("mpiexec", "mpirun", "orterun"):
            return "@MPIRUN@"
        for root, tag in ((build_dir, None), (source_dir, "@SRC@")):
            if real == root or real.startswith(root + "/"):
                rel = os.path.relpath(real, root)
                if tag:
                    return f"{tag}/{rel}"
                if os.path.isfile(real):  # built or generated files travel in the package
                    files.add(rel)
                    return f"@PKG@/{rel}"
                return f"@WORK@/{rel}"
        return arg

    file_commands, _ = ctest_file_commands(build_dir)
    tests = []
    for t in json.loads(shown).get("tests", []):
        props = props_of(t)
        if not t.get("command"):  # ctest hides a command whose executable is not built
            print(f"gpu_tests.py: warning: {t['name']}: {' '.join(file_commands.get(t['name'], []))} is not built",
                  file=sys.stderr)
            t["command"] = file_commands.get(t["name"], [])
        env = [relocate_env(e, relocate) for e in props.get("ENVIRONMENT", [])]
        tests.append({
            "name": t["name"],
            "command": [relocate(a) for a in t.get("command", [])],
            "env": env,
            "cwd": relocate(props.get("WORKING_DIRECTORY", "")) or "@WORK@",
            "timeout": float(props.get("TIMEOUT", 0) or 0),
            "skip_return_code": props.get("SKIP_RETURN_CODE"),
            "pass_regex": props.get("PASS_REGULAR_EXPRESSION", []),
            "fail_regex": props.get("FAIL_REGULAR_EXPRESSION", []),
            "skip_regex": props.get("SKIP_REGULAR_EXPRESSION", []),
            "will_fail": bool(props.get("WILL_FAIL", False)),
        })
    with open(out_path, "w") as f:
        json.dump({"tests": tests, "files": sorted(files)}, f, indent=1)
    for rel in sorted(files):
        print(rel)


def ctest_file_commands(build_dir):
    """(commands by test name, names labelled gpu) from the build tree's CTestTestfile.cmake files."""
    add_re = re.compile(r'^add_test\(\[=\[(.*?)\]=\] (.*)\)$')
    props_re = re.compile(r'^set_tests_properties\(\[=\[(.*?)\]=\] PROPERTIES (.*)\)$')
    commands, gpu = {}, set()
    for folder, _, names in os.walk(build_dir):
        if "CTestTestfile.cmake" not in names:
            continue
        with open(os.path.join(folder, "CTestTestfile.cmake")) as f:
            for line in f:
                line = line.rstrip("\n")
                m = add_re.match(line)
                if m:
                    commands[m.group(1)] = re.findall(r'"([^"]*)"', m.group(2))
                m = props_re.match(line)
                if m and re.search(r'LABELS "([^"]*;)?gpu(;[^"]*)?"', m.group(2)):
                    gpu.add(m.group(1))
    return commands, gpu


def build_outputs(build_dir):
    build_dir = os.path.realpath(build_dir)
    commands, gpu = ctest_file_commands(build_dir)
    outputs = set()
    for name in gpu:
        for arg in commands.get(name, []):
            if arg.startswith(build_dir + "/"):
                outputs.add(os.path.relpath(arg, build_dir))
    for rel in sorted(outputs):
        print(rel)


def relocate_env(entry, relocate):
    key, _, value = entry.partition("=")
    return f"{key}={relocate(value)}"


def substitute(s, subs):
    if not isinstance(s, str):
        return s
    for k, v in subs.items():
        s = s.replace(k, v)
    return s


def verdict(test, rc, output):
    def any_match(patterns):
        return any(re.search(p, output) for p in patterns)

    if test["skip_regex"] and any_match(test["skip_regex"]):
        return "skipped"
    if test["skip_return_code"] is not None and rc == int(test["skip_return_code"]):
        return "skipped"
    if test["pass_regex"]:
        ok = any_match(test["pass_regex"])
    else:
        ok = (rc != 0) if test["will_fail"] else (rc == 0)
    if test["fail_regex"] and any_match(test["fail_regex"]):
        ok = False
    return "passed" if ok else "failed"


def run_command(cmd, cwd, env, limit):
    """(exit code or "timeout", output). The test runs in a process group of its own, killed as a
    whole at the limit: mpirun's ranks and the processes a script started must not outlive it
    (they would hold the GPU during the next tests), and what it printed is kept for the log."""
    p = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        out, _ = p.communicate(timeout=limit)
        rc = p.returncode
    except subprocess.TimeoutExpired as e:
        out, rc = e.output, "timeout"
        # SIGTERM first: mpirun then ends the ranks it started (they run in groups of their own).
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(p.pid, sig)
            except ProcessLookupError:
                pass
            try:
                out, _ = p.communicate(timeout=10)
                break
            except subprocess.TimeoutExpired as again:
                out = again.output or out
    return rc, (out or b"").decode(errors="replace")


def run_tests(manifest, pkg, src, work, budget_s, log_path):
    start = time.time()
    with open(manifest) as f:
        tests = json.load(f)["tests"]
    mpirun = shutil.which("mpirun") or "mpirun"
    subs = {"@PKG@": os.path.realpath(pkg), "@SRC@": os.path.realpath(src), "@WORK@": os.path.realpath(work),
            "@MPIRUN@": mpirun}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    failed = []
    log = open(log_path, "a") if log_path else sys.stdout
    for t in tests:
        left = budget_s - (time.time() - start)
        limit = min(t["timeout"] or 300.0, left - 5)
        name = t["name"]
        if limit < 5:
            print(f"{name}: not run (the time budget is spent)", flush=True)
            counts["failed"] += 1
            failed.append(name + " (not run)")
            continue
        cmd = [substitute(a, subs) for a in t["command"]]
        env = dict(os.environ)
        for e in t["env"]:
            k, _, v = substitute(e, subs).partition("=")
            env[k] = v
        cwd = substitute(t["cwd"], subs)
        os.makedirs(cwd, exist_ok=True)
        for a in cmd:  # work folders named on the command line exist, as in the build tree
            if a.startswith(subs["@WORK@"] + "/"):
                os.makedirs(os.path.dirname(a), exist_ok=True)
        t0 = time.time()
        try:
            rc, output = run_command(cmd, cwd, env, limit)
            v = "failed" if rc == "timeout" else verdict(t, rc, output)
        except OSError as e:
            rc, output, v = "not started", str(e), "failed"
        took = time.time() - t0
        counts[v] += 1
        if v == "failed":
            failed.append(name)
        line = f"{name}: {v} (exit {rc}) in {took:.1f} s"
        print(line, flush=True)
        print(f"==== {line}\n$ {' '.join(cmd)}\n{output}", file=log, flush=True)
    print(f"gpu tests: {counts['passed']} passed, {counts['failed']} failed, {counts['skipped']} skipped"
          + (f" (failed: {', '.join(failed)})" if failed else ""))
    return 1 if failed else 0


def main(argv):
    if len(argv) >= 3 and argv[1] == "outputs":
        build_outputs(argv[2])
        return 0
    if len(argv) >= 5 and argv[1] == "manifest":
        make_manifest(argv[2], argv[3], argv[4])
        return 0
    if len(argv) >= 6 and argv[1] == "run":
        budget, log = 480.0, ""
        rest = argv[6:]
        while rest:
            if rest[0] == "--budget-s" and len(rest) > 1:
                budget, rest = float(rest[1]), rest[2:]
            elif rest[0] == "--log" and len(rest) > 1:
                log, rest = rest[1], rest[2:]
            else:
                sys.exit(f"gpu_tests.py: unknown argument {rest[0]}")
        return run_tests(argv[2], argv[3], argv[4], argv[5], budget, log)
    print(__doc__)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv))
