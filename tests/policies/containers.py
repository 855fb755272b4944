"""A test policy for real containers (tests/test_runtimes.py, tests/test_scale.py).

``mkdir``/``mkdirat`` are decided by the directory's name, so a busybox shell in the
container can ask for each kind of answer and print what it got:

* ``.../deny-*``   -> deny(option ``errno``, default EPERM)
* ``.../ret-*``    -> returns(0): mkdir "succeeds" but the kernel never ran it
* ``.../allow-*``  -> allow (CONTINUE): the directory really is created
* anything else    -> no decision (next policy, then ``[defaults].unhandled``)

``openat`` of ``/inject`` answers with an fd this policy opened (inject_fd): a memfd
holding one line ``tag=T id=ID status=S pid=P caller=TID labels=K=V,...
pod=NAMESPACE/POD/CONTAINER``, so ``cat
/inject`` in the container shows which policy answered and what the runtime sent.
Other ``openat`` calls get CONTINUE (decided on the path: marked unchecked).

Option ``tag`` names the instance (two ``[[policy]]`` entries of this file are
independent PolicySets).
"""

from __future__ import annotations

import errno
import os

from supervisor.policy import Decision, Notification, PolicySet, allow, deny, inject_fd, returns

policy = PolicySet("containers", defaults={"tag": "containers", "errno": errno.EPERM})


@policy.on("mkdir", "mkdirat")
async def by_name(n: Notification) -> Decision | None:
    path = await n.read_path(0 if n.syscall == "mkdir" else 1)
    name = path.rstrip(b"/").rsplit(b"/", 1)[-1]
    if name.startswith(b"deny-"):
        return deny(policy.options["errno"],
                    reason=f"{policy.options['tag']}: {os.fsdecode(path)}")
    if name.startswith(b"ret-"):
        return returns(0, reason="pretend")
    if name.startswith(b"allow-"):
        return allow(unchecked=True, reason="test allows it")
    return None


@policy.on("openat")
async def inject(n: Notification) -> Decision:
    path = await n.read_path(1)
    if path != b"/inject":
        return allow(unchecked=True)
    c = n.container
    labels = ",".join(f"{k}={v}" for k, v in sorted(c.labels.items()))
    line = (f"tag={policy.options['tag']} id={c.id} status={c.status} pid={c.pid} "
            f"caller={n.pid} labels={labels} "
            f"pod={c.pod_namespace}/{c.pod_name}/{c.name}\n")
    fd = os.memfd_create("inject")
    try:
        os.write(fd, line.encode())
        os.lseek(fd, 0, os.SEEK_SET)
    except BaseException:
        os.close(fd)
        raise
    return inject_fd(fd, reason="test inject")
