/*
 * bench/sup_mem.c - C reference for the memory-reading rows of bench/run.py:
 * what a supervisor that reads a path from the caller's memory costs when it
 * does nothing else.
 *
 *   sup_mem --sock PATH --prefix /guarded
 *
 * Listens on PATH for runc-style hand-offs (one connection = the JSON state
 * and the listener fd as SCM_RIGHTS), then one epoll loop over every fd:
 *
 *   getppid            -> EPERM (the target's warm-up calls)
 *   mkdir              -> path = arg 0
 *   mkdirat, openat    -> path = arg 1
 *
 * The path is read with process_vm_readv up to each page end in turn (a
 * path may end just before an unmapped page) until its NUL, at most
 * PATH_MAX bytes; then SECCOMP_IOCTL_NOTIF_ID_VALID (the pid was not reused
 * while we read: the bytes are the caller's); then a prefix compare: the
 * path is the prefix or below it -> EACCES, else CONTINUE.  What
 * policies/path_guard.py does in advisory mode for an absolute path, minus
 * the lexical normalisation.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/seccomp.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <unistd.h>

#define PATH_MAX_BYTES 4096

static const char *g_prefix = "/guarded";
static size_t g_prefix_len;

static void die(const char *what)
{
	perror(what);
	exit(3);
}

static int fd_is_dead(int fd)
{
	struct pollfd p = { .fd = fd, .events = POLLIN };

	return poll(&p, 1, 0) == 1 && (p.revents & (POLLHUP | POLLERR)) &&
	       !(p.revents & POLLIN);
}

/* Read the NUL-terminated string at addr of pid into buf; 0 or an errno. */
static int read_path(pid_t pid, uint64_t addr, char *buf)
{
	size_t got = 0;
	long page = 4096;

	while (got < PATH_MAX_BYTES) {
		size_t room = page - ((addr + got) % page);
		struct iovec local, remote;
		ssize_t n;

		if (room > PATH_MAX_BYTES - got)
			room = PATH_MAX_BYTES - got;
		local.iov_base = buf + got;
		local.iov_len = room;
		remote.iov_base = (void *)(uintptr_t)(addr + got);
		remote.iov_len = room;
		n = process_vm_readv(pid, &local, 1, &remote, 1, 0);
		if (n <= 0)
			return n == 0 ? EFAULT : errno;
		if (memchr(buf + got, 0, (size_t)n))
			return 0;
		got += (size_t)n;
	}
	return ENAMETOOLONG;
}

static int guarded(const char *path)
{
	return strncmp(path, g_prefix, g_prefix_len) == 0 &&
	       (path[g_prefix_len] == 0 || path[g_prefix_len] == '/');
}

/* Receive one notification and answer it; -1 once the fd is finished. */
static int handle_one(int fd)
{
	static char path[PATH_MAX_BYTES];
	struct seccomp_notif req;
	struct seccomp_notif_resp resp = { 0 };
	int path_arg = -1, err;

	memset(&req, 0, sizeof(req));
	if (ioctl(fd, SECCOMP_IOCTL_NOTIF_RECV, &req) < 0) {
		if (errno == EINTR || (errno == ENOENT && !fd_is_dead(fd)))
			return 0;
		return -1;
	}
	resp.id = req.id;
	if (req.data.nr == SYS_getppid) {
		resp.error = -EPERM;
		goto send;
	}
	if (req.data.nr == SYS_mkdir)
		path_arg = 0;
	else if (req.data.nr == SYS_mkdirat || req.data.nr == SYS_openat)
		path_arg = 1;
	if (path_arg < 0) {
		resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
		goto send;
	}
	err = read_path((pid_t)req.pid, req.data.args[path_arg], path);
	if (ioctl(fd, SECCOMP_IOCTL_NOTIF_ID_VALID, &req.id) != 0)
		return 0;	/* the caller died: its pid may be another's now */
	if (err)
		resp.error = -err;
	else if (guarded(path))
		resp.error = -EACCES;
	else
		resp.flags = SECCOMP_USER_NOTIF_FLAG_CONTINUE;
send:
	if (ioctl(fd, SECCOMP_IOCTL_NOTIF_SEND, &resp) < 0 && errno != ENOENT)
		perror("sup_mem: NOTIF_SEND");
	return 0;
}

static int listen_unix(const char *path)
{
	struct sockaddr_un sa = { .sun_family = AF_UNIX };
	int s = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);

	if (s < 0)
		die("socket");
	snprintf(sa.sun_path, sizeof(sa.sun_path), "%s", path);
	unlink(path);
	if (bind(s, (struct sockaddr *)&sa, sizeof(sa)) || listen(s, 1024))
		die("bind/listen");
	return s;
}

/* One runc hand-off: the JSON state and the listener fd; -1 if malformed. */
static int accept_runc_fd(int lsock)
{
	static char buf[65536];
	union {
		char buf[CMSG_SPACE(16 * sizeof(int))];
		struct cmsghdr align;
	} control;
	struct iovec iov = { buf, sizeof(buf) - 1 };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1,
			      .msg_control = control.buf,
			      .msg_controllen = sizeof(control.buf) };
	struct cmsghdr *cmsg;
	int c = accept4(lsock, NULL, NULL, SOCK_CLOEXEC), fd = -1;
	ssize_t n;

	if (c < 0)
		return -1;
	n = recvmsg(c, &msg, MSG_CMSG_CLOEXEC);
	close(c);
	for (cmsg = CMSG_FIRSTHDR(&msg); n > 0 && cmsg; cmsg = CMSG_NXTHDR(&msg, cmsg)) {
		if (cmsg->cmsg_level != SOL_SOCKET || cmsg->cmsg_type != SCM_RIGHTS)
			continue;
		int count = (int)((cmsg->cmsg_len - CMSG_LEN(0)) / sizeof(int));
		int *fds = (int *)CMSG_DATA(cmsg);

		for (int i = 0; i < count; i++) {
			if (fd < 0)
				fd = fds[i];
			else
				close(fds[i]);
		}
	}
	if (n <= 0 || !memmem(buf, (size_t)n, "\"seccompFd\"", 11)) {
		if (fd >= 0)
			close(fd);
		return -1;
	}
	return fd;
}

int main(int argc, char **argv)
{
	const char *sock = NULL;
	struct epoll_event ev, evs[64];
	int ep, lsock;

	for (int i = 1; i + 1 < argc; i += 2) {
		if (!strcmp(argv[i], "--sock"))
			sock = argv[i + 1];
		else if (!strcmp(argv[i], "--prefix"))
			g_prefix = argv[i + 1];
	}
	if (!sock) {
		fprintf(stderr, "usage: sup_mem --sock PATH [--prefix DIR]\n");
		return 2;
	}
	g_prefix_len = strlen(g_prefix);
	lsock = listen_unix(sock);
	ep = epoll_create1(EPOLL_CLOEXEC);
	if (ep < 0)
		die("epoll_create1");
	ev.events = EPOLLIN;
	ev.data.fd = lsock;
	if (epoll_ctl(ep, EPOLL_CTL_ADD, lsock, &ev))
		die("epoll_ctl");
	for (;;) {
		int n = epoll_wait(ep, evs, 64, -1);

		if (n < 0 && errno != EINTR)
			die("epoll_wait");
		for (int i = 0; i < n; i++) {
			int fd = evs[i].data.fd;

			if (fd == lsock) {
				int lfd = accept_runc_fd(lsock);

				if (lfd < 0)
					continue;
				ev.events = EPOLLIN;
				ev.data.fd = lfd;
				if (epoll_ctl(ep, EPOLL_CTL_ADD, lfd, &ev))
					die("epoll_ctl");
			} else if ((evs[i].events & EPOLLIN) ? handle_one(fd) < 0
							   : fd_is_dead(fd)) {
				epoll_ctl(ep, EPOLL_CTL_DEL, fd, NULL);
				close(fd);
			}
		}
	}
}
