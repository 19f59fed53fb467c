"""The first process of a run the Slicer module starts (child_process.py): it runs the command line's ``segment``
as its own child, the worker, and answers for what the worker cannot.

- Slicer is killed mid-run: the guard watches Slicer's process, and when it is gone it ends the worker and
  removes the run's folder, the copy of the patient's volume and any result in it. On Linux the worker also
  dies with the guard (PR_SET_PDEATHSIG), should the guard itself be killed.
- The worker is ended by a signal (the system's out-of-memory killer, a crash in native code): inside Slicer
  the process Slicer started is the PythonSlicer launcher, which reports any such end as "exit abnormally"
  with exit code 1; the guard sees the worker's own status and writes what happened and what to do as the
  run's error line (``core.run_events``).

Standard library only: it starts before anything heavy is imported and never imports torch or slicer.

    python -c BOOTSTRAP CDMSegmentLib.slicer_adapters.child_guard SLICER_PID FOLDER -- MODULE ARGUMENTS...

runs ``python -m MODULE ARGUMENTS...`` as the worker, in this same interpreter (inside Slicer, the launcher has
already set its environment up) and with this same copy of CDMSegmentLib first on its path.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Sequence

PARENT_POLL_S = 0.25
LIBRARY_PARENT = Path(__file__).resolve().parents[2]  # the folder holding CDMSegmentLib
RUN_FOLDER_PREFIX = "CDMSegment-"  # CDMSegment-<pid of the Slicer that made it>-<random>
NOTHING_ADDED = "nothing was added to the scene"
MEMORY_ADVICE = ("try fewer slices per batch (Advanced > Batch size), close other programs, or choose the CPU as "
                 "the device")
CRASH_ADVICE = ("try the CPU as the device, or update PyTorch in the PyTorch module; if it happens again, please "
                "report it with the application log")
# What a worker ended by a signal means for the user and what to do; the sentence starts "the CDMSegment
# process ". SIGKILL is what Linux's out-of-memory killer sends (Cancel also sends it, but is told apart).
SIGNAL_MEANINGS = {
    "SIGKILL": f"was killed (SIGKILL), most often by the system when memory runs out; {NOTHING_ADDED}; "
               f"{MEMORY_ADVICE}",
    "SIGSEGV": f"crashed (SIGSEGV, a memory access fault inside torch or a graphics driver); {NOTHING_ADDED}; "
               f"{CRASH_ADVICE}",
    "SIGBUS": f"crashed (SIGBUS: memory that could not be read, often a full disk or a file removed while in use); "
              f"{NOTHING_ADDED}; free some disk space and try again",
    "SIGABRT": f"aborted (SIGABRT, a fatal error inside torch or a library it uses); {NOTHING_ADDED}; {CRASH_ADVICE}",
    "SIGILL": f"crashed (SIGILL: this PyTorch build uses processor instructions this computer lacks); "
              f"{NOTHING_ADDED}; install another PyTorch build in the PyTorch module",
    "SIGFPE": f"crashed (SIGFPE, an arithmetic fault inside native code); {NOTHING_ADDED}; {CRASH_ADVICE}",
    "SIGTERM": f"was ended (SIGTERM) by another program or by the system shutting down; {NOTHING_ADDED}; press "
               "Apply to run again",
    "SIGINT": f"was interrupted (SIGINT); {NOTHING_ADDED}; press Apply to run again",
    "SIGHUP": f"was ended (SIGHUP: its terminal or session closed); {NOTHING_ADDED}; press Apply to run again",
}
# Windows reports a crash as the NTSTATUS code in the exit code.
WINDOWS_CRASHES = {
    0xC0000005: f"crashed (access violation, 0xC0000005, inside torch or a graphics driver); {NOTHING_ADDED}; "
                f"{CRASH_ADVICE}",
    0xC0000017: f"ran out of memory (0xC0000017); {NOTHING_ADDED}; {MEMORY_ADVICE}",
    0xC00000FD: f"crashed (stack overflow, 0xC00000FD); {NOTHING_ADDED}; {CRASH_ADVICE}",
    0xC0000409: f"aborted (0xC0000409, a fatal error inside torch or a library it uses); {NOTHING_ADDED}; "
                f"{CRASH_ADVICE}",
    0xC000001D: f"crashed (illegal instruction, 0xC000001D: this PyTorch build uses processor instructions this "
                f"computer lacks); {NOTHING_ADDED}; install another PyTorch build in the PyTorch module",
}


def library_first(python: str, module: str, arguments: Sequence[str], library_parent: Path) -> List[str]:
    """A command running ``python -m module arguments...`` with ``library_parent`` first on sys.path.

    PYTHONPATH cannot promise that: Slicer's PythonSlicer launcher puts its own entries (an installed copy of the
    extension among them) before the PYTHONPATH it is given, so a panel running from a developer's clone would
    start the installed copy's code."""
    bootstrap = (f"import runpy, sys; sys.path.insert(0, {str(library_parent)!r}); "
                 f"runpy.run_module({module!r}, run_name='__main__', alter_sys=True)")
    return [python, "-c", bootstrap, *map(str, arguments)]


def signal_sentence(returncode: int) -> str:
    """What a process that ended with ``returncode`` by a signal (negative on POSIX) or a crash (an NTSTATUS
    code on Windows) means for the user; '' for an ordinary exit code."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        meaning = SIGNAL_MEANINGS.get(name, f"was ended by {name}; {NOTHING_ADDED}")
        return f"the CDMSegment process {meaning}"
    if returncode & 0xFFFFFFFF in WINDOWS_CRASHES:
        return f"the CDMSegment process {WINDOWS_CRASHES[returncode & 0xFFFFFFFF]}"
    if returncode & 0xFFFFFFFF >= 0xC0000000:
        return f"the CDMSegment process crashed (0x{returncode & 0xFFFFFFFF:08X}); {NOTHING_ADDED}; {CRASH_ADVICE}"
    return ""


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user counts as alive)."""
    if os.name == "nt":
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return kernel32.GetLastError() == 5  # access denied: it exists
        code = ctypes.c_ulong()
        kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _die_with_parent() -> None:
    """preexec_fn of the worker on Linux: the kernel kills it when the guard ends, however the guard ends."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def hidden_console_options() -> dict:
    """Popen options that start a console program without a console window on Windows, as Slicer's
    ``slicer.util.launchConsoleProcess`` does (STARTF_USESHOWWINDOW with SW_HIDE); none elsewhere."""
    if os.name != "nt":
        return {}
    info = subprocess.STARTUPINFO()
    info.dwFlags |= subprocess.STARTF_USESHOWWINDOW
    info.wShowWindow = subprocess.SW_HIDE
    return {"startupinfo": info, "creationflags": subprocess.CREATE_NO_WINDOW}


def run_folder_owner(folder: Path) -> int:
    """The id of the process that made a run folder (CDMSegment-<pid>-...), or 0 when the name holds none."""
    pid = folder.name[len(RUN_FOLDER_PREFIX):].split("-", 1)[0]
    return int(pid) if folder.name.startswith(RUN_FOLDER_PREFIX) and pid.isdigit() else 0


def remove_orphaned_run_folders(temporary: Path) -> List[Path]:
    """Remove the run folders (patient copies and results) whose Slicer is gone: left by a Slicer or a machine that
    was killed before anything could clean up. Only this user's folders are touched. Returns those removed."""
    removed = []
    for folder in Path(temporary).glob(f"{RUN_FOLDER_PREFIX}*"):
        owner = run_folder_owner(folder)
        try:
            mine = os.name == "nt" or folder.stat().st_uid == os.getuid()
        except OSError:
            continue
        if owner and mine and folder.is_dir() and not pid_alive(owner):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _report(message: str) -> None:
    """The run's error line, on a line of its own (the worker may have died in the middle of one)."""
    sys.stdout.write("\n" + json.dumps({"event": "error", "message": message}) + "\n")
    sys.stdout.flush()


def guard(parent_pid: int, folder: Path, worker: Sequence[str]) -> int:
    """Run ``worker`` until it ends or Slicer (``parent_pid``) is gone; -> the exit code to end with."""
    options = {"preexec_fn": _die_with_parent} if sys.platform.startswith("linux") else {}
    process = subprocess.Popen(list(worker), stdin=subprocess.DEVNULL, **hidden_console_options(), **options)
    while True:
        try:
            returncode = process.wait(PARENT_POLL_S)
            break
        except subprocess.TimeoutExpired:
            pass
        if not pid_alive(parent_pid):
            process.kill()
            process.wait()
            shutil.rmtree(folder, ignore_errors=True)
            return 1
    sentence = signal_sentence(returncode)
    if sentence:
        _report(sentence)
        return 1
    return returncode


def main(argv: Sequence[str]) -> int:
    parent_pid, folder, separator, module, *arguments = argv
    if separator != "--":
        raise SystemExit("usage: child_guard SLICER_PID FOLDER -- MODULE ARGUMENTS...")
    return guard(int(parent_pid), Path(folder), library_first(sys.executable, module, arguments, LIBRARY_PARENT))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
