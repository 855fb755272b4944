/* What the benchmark's C targets share (bench/target.c, bench/flood.c): installing a
 * NOTIFY filter and handing its listener over as runc does, and waiting for the harness.
 * The including file defines `static void fail(const char *what)` (prints and exits)
 * before including this. */
#ifndef SECCOMP_SUPERVISOR_BENCH_HANDOFF_H
#define SECCOMP_SUPERVISOR_BENCH_HANDOFF_H

#include <errno.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stdio.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

static void fail(const char *what);

/* Install `code` as a NOTIFY filter of this process; returns the listener fd. */
static int install_listener(struct sock_filter *code, unsigned short len)
{
	struct sock_fprog prog = { len, code };
	long fd;

	if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0)
		fail("PR_SET_NO_NEW_PRIVS");
	fd = syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER,
		     SECCOMP_FILTER_FLAG_NEW_LISTENER, &prog);
	if (fd < 0)
		fail("seccomp(SET_MODE_FILTER)");
	return (int)fd;
}

/* What runc does with linux.seccomp.listenerPath: one connection, one
 * sendmsg carrying the state document and the listener fd. */
static void hand_over(const char *path, const char *prefix, const char *id, int listener)
{
	struct sockaddr_un addr = { .sun_family = AF_UNIX };
	char doc[512];
	int len = snprintf(doc, sizeof(doc),
		"{\"ociVersion\":\"1.0.2\",\"fds\":[\"seccompFd\"],\"pid\":%d,"
		"\"metadata\":\"bench=1\",\"state\":{\"ociVersion\":\"1.0.2\","
		"\"id\":\"%s-%s\",\"status\":\"creating\",\"pid\":%d,"
		"\"bundle\":\"/tmp\"}}", (int)getpid(), prefix, id, (int)getpid());
	union {
		char buf[CMSG_SPACE(sizeof(int))];
		struct cmsghdr align;
	} control;
	struct iovec iov = { doc, (size_t)len };
	struct msghdr msg = {
		.msg_iov = &iov, .msg_iovlen = 1,
		.msg_control = control.buf, .msg_controllen = sizeof(control.buf),
	};
	struct cmsghdr *cmsg;
	int sock;

	snprintf(addr.sun_path, sizeof(addr.sun_path), "%s", path);
	sock = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
	if (sock < 0)
		fail("socket");
	/* The socket file may exist a moment before listen(): retry for 10 s. */
	for (int tries = 0; connect(sock, (struct sockaddr *)&addr, sizeof(addr)) != 0;
	     tries++) {
		if ((errno != ECONNREFUSED && errno != ENOENT && errno != EINTR) ||
		    tries == 1000)
			fail("connect to the supervisor");
		usleep(10000);
	}
	memset(&control, 0, sizeof(control));
	cmsg = CMSG_FIRSTHDR(&msg);
	cmsg->cmsg_level = SOL_SOCKET;
	cmsg->cmsg_type = SCM_RIGHTS;
	cmsg->cmsg_len = CMSG_LEN(sizeof(int));
	memcpy(CMSG_DATA(cmsg), &listener, sizeof(int));
	if (sendmsg(sock, &msg, MSG_NOSIGNAL) != len)
		fail("sendmsg");
	close(sock);
	close(listener);
}

static void drain_until_eof(int fd)
{
	char c;

	for (;;) {
		ssize_t n = read(fd, &c, 1);

		if (n == 0 || (n < 0 && errno != EINTR))
			return;
	}
}

#endif
