"""A test target: makes system calls through ctypes and prints what they returned.

Run under a notify filter by the tests: ``python3 tests/target.py COMMAND ARGS``. The
output is one JSON object on stdout. Uses only the standard library.
"""

import ctypes
import json
import mmap
import os
import signal
import sys
import threading
import time

libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long


def call(func, *args):
    ctypes.set_errno(0)
    rc = func(*args)
    return {"rc": rc, "errno": ctypes.get_errno() if rc == -1 else 0}


def getppid_raw():
    # glibc may cache nothing for getppid, but go through syscall() to be sure.
    return call(libc.syscall, ctypes.c_long(110))


def uffd_page():
    """A userfaultfd and the address of a page registered with it (missing pages)."""
    import fcntl
    import struct
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long]
    uffd = libc.syscall(ctypes.c_long(323), os.O_CLOEXEC)  # userfaultfd
    assert uffd >= 0, ctypes.get_errno()
    fcntl.ioctl(uffd, 0xc018aa3f, bytearray(struct.pack("QQQ", 0xAA, 0, 0)))  # API
    page = libc.mmap(None, mmap.PAGESIZE, 3, 0x22, -1, 0)  # RW, PRIVATE|ANONYMOUS
    fcntl.ioctl(uffd, 0xc020aa00,  # UFFDIO_REGISTER, MISSING
                bytearray(struct.pack("QQQQ", page, mmap.PAGESIZE, 1, 0)))
    return uffd, page


def unserved_page():
    """The address of a page registered with a userfaultfd nobody serves: reading it
    blocks until this process exits."""
    return uffd_page()[1]


def slow_page(delay, content):
    """The address of a page registered with a userfaultfd that a thread of this process
    serves (with ``content``) ``delay`` seconds after each fault: reading it takes that
    long. madvise(MADV_DONTNEED) on it makes the next read fault again."""
    import fcntl
    import select
    import struct
    uffd, page = uffd_page()
    source = ctypes.create_string_buffer(content.ljust(mmap.PAGESIZE, b"\0"))

    def serve():
        while True:
            select.select([uffd], [], [])
            try:
                os.read(uffd, 32)  # struct uffd_msg: a page fault on our page
            except BlockingIOError:
                continue
            time.sleep(delay)
            fcntl.ioctl(uffd, 0xc028aa03,  # UFFDIO_COPY
                        bytearray(struct.pack("QQQQq", page, ctypes.addressof(source),
                                              mmap.PAGESIZE, 0, 0)))

    threading.Thread(target=serve, daemon=True).start()
    return page


NUMBERS = {"getppid": 110, "yield": 24}


def timed(func, *args):
    t0 = time.monotonic()
    r = call(func, *args)
    r["seconds"] = time.monotonic() - t0
    return r


def main(argv):
    cmd = argv[0]
    if cmd == "getppid":
        out = [getppid_raw() for _ in range(int(argv[1]) if len(argv) > 1 else 1)]
        return {"results": out}
    if cmd == "numbers":
        # syscall(n) for every n in [first, first + count): numbers no kernel knows.
        first, count = int(argv[1]), int(argv[2])
        return {"errnos": sorted({call(libc.syscall, ctypes.c_long(n))["errno"]
                                  for n in range(first, first + count)})}
    if cmd == "mkdir":
        return call(libc.mkdir, argv[1].encode(), 0o755)
    if cmd == "mkdir-null":
        return call(libc.mkdir, None, 0o755)
    if cmd == "mkdir-null-repeat":
        # mkdir(NULL) COUNT times: every answer, in order.
        return {"results": [call(libc.mkdir, None, 0o755) for _ in range(int(argv[1]))]}
    if cmd == "mkdir-unmapped":
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                              ctypes.c_int, ctypes.c_long]
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        addr = libc.mmap(None, mmap.PAGESIZE, 3, 0x22, -1, 0)  # RW, PRIVATE|ANONYMOUS
        libc.munmap(addr, mmap.PAGESIZE)  # keep the address, drop the mapping
        return call(libc.mkdir, ctypes.c_void_p(addr), 0o755)
    if cmd == "mkdir-long":
        # 5,000 bytes with no NUL before the end of the mapping's first 5,000 bytes.
        buf = ctypes.create_string_buffer(b"a" * 5000)
        return call(libc.mkdir, buf, 0o755)
    if cmd == "mkdir-ok-then":
        # mkdir("/ok") first (so the session knows the call's route), then COMMAND ARGS...:
        # its result (tests/test_round_reads.py: the first call of a route is routed in
        # Python).
        call(libc.mkdir, b"/ok", 0o755)
        return main(argv[1:])
    if cmd == "mkdir-slow":
        # mkdir() COUNT times with its path on a page whose every read takes DELAY s
        # (a userfaultfd this process serves late): every answer, in order.
        delay, count = float(argv[1]), int(argv[2])
        page = slow_page(delay, b"/slow")
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        results = []
        for _ in range(count):
            libc.madvise(ctypes.c_void_p(page), mmap.PAGESIZE, 4)  # MADV_DONTNEED
            results.append(call(libc.mkdir, ctypes.c_void_p(page), 0o755))
        return {"results": results}
    if cmd == "masked":
        # SIGUSR1 blocked (in this thread, the threads and the children it makes later),
        # so that `go` can wait for it however early it comes, and then caught (a handler
        # that never runs: the test sees it in /proc/PID/status, SigCgt, and may send it
        # from then on); then COMMAND ARGS...: its result.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
        signal.signal(signal.SIGUSR1, lambda *_: None)
        return main(argv[1:])
    if cmd == "go":
        # Wait for SIGUSR1 (`masked` before: one sent earlier is pending), then COMMAND
        # ARGS...: its result (tests/test_round_reads.py: the test chooses when, and in
        # which order, the calls of several targets come).
        if signal.sigtimedwait({signal.SIGUSR1}, 60) is None:
            raise SystemExit("no SIGUSR1 came")
        return main(argv[1:])
    if cmd == "mkdir-timed":
        return timed(libc.mkdir, argv[1].encode(), 0o755)
    if cmd == "mount":
        # mount(SOURCE, TARGET, FSTYPE, 0, DATA): four strings.
        return call(libc.mount, *(a.encode() for a in argv[1:4]), ctypes.c_ulong(0),
                    argv[4].encode())
    if cmd == "mount-ok-then":
        # mount("/ok", "/ok", "ok", 0, "ok") first (its route), then COMMAND ARGS...
        call(libc.mount, b"/ok", b"/ok", b"ok", ctypes.c_ulong(0), b"ok")
        return main(argv[1:])
    if cmd == "uffd-mkdir":
        # mkdir() with its path on a page registered with a userfaultfd nobody here
        # serves, once SIGUSR1 came (`masked` first): "PID UFFD PAGE" (this process, the
        # userfaultfd's fd number, the page's address) is written to the file INFO
        # before, for the test to take a copy of the userfaultfd (pidfd_getfd) and serve
        # the page from there. Its answer, with how long it took.
        uffd, page = uffd_page()
        with open(argv[1] + ".tmp", "w") as f:
            f.write(f"{os.getpid()} {uffd} {page}")
        os.rename(argv[1] + ".tmp", argv[1])
        if signal.sigtimedwait({signal.SIGUSR1}, 60) is None:
            raise SystemExit("no SIGUSR1 came")
        return timed(libc.mkdir, ctypes.c_void_p(page), 0o755)
    if cmd == "child-uffd-mkdir":
        # A child process (under the same filter: its calls come to the same listener)
        # does `uffd-mkdir INFO`; this one waits for it to end (the test kills it in its
        # call), then calls mkdir("/abc") COUNT times: the signal that ended the child
        # (or None) and every answer.
        child = os.fork()
        if child == 0:
            try:
                main(["uffd-mkdir", argv[1]])
            finally:
                os._exit(0)
        _, status = os.waitpid(child, 0)
        return {"child": os.WTERMSIG(status) if os.WIFSIGNALED(status) else None,
                "results": [call(libc.mkdir, b"/abc", 0o755) for _ in range(int(argv[2]))]}
    if cmd == "mkdir-repeat":
        # mkdir(PATH) COUNT times, one after another: every answer, in order.
        return {"results": [call(libc.mkdir, argv[1].encode(), 0o755)
                            for _ in range(int(argv[2]))]}
    if cmd == "mkdir-at":
        # mkdir() with the path pointer ADDR (hex), whatever it points to.
        return call(libc.mkdir, ctypes.c_void_p(int(argv[1], 16)), 0o755)
    if cmd == "mkdir-threads":
        # COUNT threads call mkdir(PATH<i>) at once: each answer, by thread.
        count, path = int(argv[1]), argv[2]
        results = [None] * count
        barrier = threading.Barrier(count)

        def mkdir(i):
            barrier.wait()
            results[i] = call(libc.mkdir, f"{path}{i}".encode(), 0o755)

        threads = [threading.Thread(target=mkdir, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"results": results}
    if cmd == "mkdir-uffd":
        # mkdir() in a thread with its path on a page registered with a userfaultfd
        # nobody serves (reading it blocks until this process exits); meanwhile CALLS
        # getppid calls, PAUSE s apart, each timed; then the mkdir's answer.
        page = unserved_page()
        getppid_raw()  # served: the session is up
        stuck = {}

        def mkdir():
            t0 = time.monotonic()
            r = call(libc.mkdir, ctypes.c_void_p(page), 0o755)
            r["seconds"] = time.monotonic() - t0
            stuck.update(r)

        threading.Thread(target=mkdir, daemon=True).start()
        time.sleep(0.2)  # its read is stuck now
        latencies = []
        for _ in range(int(argv[1])):
            t0 = time.monotonic()
            getppid_raw()
            latencies.append(time.monotonic() - t0)
            time.sleep(float(argv[2]))
        while not stuck:
            time.sleep(0.01)
        return {"latencies": latencies, "mkdir": stuck}
    if cmd == "in-flight":
        # Calls that each wait for their decision, started PAUSE s apart, each in a thread
        # of its own: per WHAT, mkdir() with its path on an unserved userfaultfd page
        # ("uffd"), getppid() or sched_yield() ("yield"). Once all returned: each answer,
        # in that order, with how long it took.
        pause, what = float(argv[1]), argv[2:]
        page = unserved_page() if "uffd" in what else 0
        results = [None] * len(what)

        def one(i, name):
            if name == "uffd":
                results[i] = timed(libc.mkdir, ctypes.c_void_p(page), 0o755)
            else:
                results[i] = timed(libc.syscall, ctypes.c_long(NUMBERS[name]))

        threads = []
        for i, name in enumerate(what):
            threads.append(threading.Thread(target=one, args=(i, name)))
            threads[-1].start()
            time.sleep(pause)
        for t in threads:
            t.join()
        return {"results": results}
    if cmd == "getppid-threads":
        # THREADS threads each call getppid COUNT times at once: the errno of each
        # answer, counted ({errno: calls}; 0 for a call that returned a value).
        count, calls = int(argv[1]), int(argv[2])
        seen = {}
        lock = threading.Lock()
        barrier = threading.Barrier(count)

        def caller():
            barrier.wait()
            mine = {}
            for _ in range(calls):
                e = getppid_raw()["errno"]
                mine[e] = mine.get(e, 0) + 1
            with lock:
                for e, n in mine.items():
                    seen[e] = seen.get(e, 0) + n

        threads = [threading.Thread(target=caller) for _ in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"errnos": {str(e): n for e, n in sorted(seen.items())}}
    if cmd == "open-read":
        fd = os.open(argv[1], os.O_RDONLY)
        data = os.read(fd, 4096).decode()
        flags = __import__("fcntl").fcntl(fd, __import__("fcntl").F_GETFD)
        os.close(fd)
        return {"fd": fd, "data": data, "cloexec": bool(flags & 1)}
    if cmd == "open-raw":
        # open(2) itself (the loader and Python use openat): COUNT times, counting the
        # answers that are not a fresh fd above stdio.
        bad = []
        for _ in range(int(argv[2])):
            fd = libc.syscall(ctypes.c_long(2), argv[1].encode(), 0)
            if fd <= 2:
                bad.append(fd)
            else:
                os.close(fd)
        return {"bad": bad}
    if cmd == "threads":
        count = int(argv[1])
        results = [None] * count
        barrier = threading.Barrier(count)

        def worker(i):
            barrier.wait()
            t0 = time.monotonic()
            r = getppid_raw()
            r["seconds"] = time.monotonic() - t0
            r["tid"] = threading.get_native_id()
            results[i] = r

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return {"results": results}
    if cmd == "restart":
        got = []
        signal.signal(signal.SIGUSR1, lambda *_: got.append(1))
        signal.siginterrupt(signal.SIGUSR1, False)  # SA_RESTART
        r = call(libc.mkdir, argv[1].encode(), 0o755)
        r["signals"] = len(got)
        if len(argv) > 2:
            time.sleep(float(argv[2]))  # stay alive so a late answer meets ENOENT
        return r
    if cmd == "sleep":
        time.sleep(float(argv[1]))
        return {}
    raise SystemExit(f"unknown command {cmd}")


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1:])), flush=True)
