/*
 * bench/target.c - one benchmark target: makes notified system calls and
 * times each one.  Written for bench/run.py; see bench/README.md.
 *
 *   bench-target SOCK ID CALLS WARMUP OUT READY_FD GO_FD DONE_FD EXIT_FD
 *                [PAUSE_US [mkdir|mkdirat:LEN|openat:LEN]]
 *
 * 1. Installs a seccomp filter that sends getppid(2) to user space
 *    (SECCOMP_RET_USER_NOTIF, NEW_LISTENER) and allows everything else.
 *    With "mkdir" (bench/neighbour.py) it sends mkdir(2) too, and the timed
 *    calls are mkdir("/guarded/neighbour"), whose answer must be EACCES
 *    (policies/path_guard.py reads the path from our memory to decide).
 *    With "mkdirat:LEN" or "openat:LEN" (bench/run.py's memory-reading rows)
 *    it sends that call too, and the timed calls are mkdirat(AT_FDCWD, P,
 *    0755) or openat(AT_FDCWD, P, O_WRONLY|O_CREAT, 0644), P an absolute
 *    path of LEN bytes under /guarded ("/guarded/aaa.../aaa...", components
 *    of at most 200 bytes); the answer must be EACCES.
 * 2. Acts as the container runtime: connects to SOCK and sends, in one
 *    sendmsg, the JSON state runc sends to a seccomp agent with the listener
 *    fd as SCM_RIGHTS, then closes the socket and its own copy of the fd.
 * 3. WARMUP calls (not timed).  The first one blocks until the supervisor
 *    serves the fd, so the harness knows every session is up.
 * 4. Writes one byte to READY_FD, reads GO_FD until EOF (the harness closes
 *    it once every target is ready: all targets start together).
 * 5. CALLS timed calls, clock_gettime(CLOCK_MONOTONIC) before and after
 *    each, PAUSE_US microseconds apart (default 0: back to back).  Every
 *    answer is checked: the supervisor must make getppid fail with EPERM;
 *    anything else is counted as wrong.
 * 6. Writes OUT: the header line
 *        "<calls> <wrong> <start_ns> <end_ns>\n"
 *    followed by CALLS native uint32 latencies in ns.
 * 7. Writes one byte to DONE_FD and reads EXIT_FD until EOF, so the
 *    supervisor still holds every session while the harness samples it.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

static void fail(const char *what)
{
	fprintf(stderr, "bench-target: %s: %s\n", what, strerror(errno));
	exit(3);
}

#include "handoff.h"

static uint64_t monotonic_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static int notify_filter(long extra_nr)
{
	struct sock_filter code[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 4),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 1, 0),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, extra_nr,
			 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	return install_listener(code, sizeof(code) / sizeof(code[0]));
}

static void put_byte(int fd)
{
	if (write(fd, "x", 1) != 1)
		fail("write to the harness");
}

int main(int argc, char **argv)
{
	if (argc < 10 || argc > 12) {
		fprintf(stderr, "usage: bench-target SOCK ID CALLS WARMUP OUT "
				"READY_FD GO_FD DONE_FD EXIT_FD "
				"[PAUSE_US [mkdir|mkdirat:LEN|openat:LEN]]\n");
		return 2;
	}
	const char *sock = argv[1], *id = argv[2], *out = argv[5];
	long calls = atol(argv[3]), warmup = atol(argv[4]);
	int ready = atoi(argv[6]), go = atoi(argv[7]);
	int done = atoi(argv[8]), quit = atoi(argv[9]);
	long pause_us = argc > 10 ? atol(argv[10]) : 0;
	const char *mode = argc > 11 ? argv[11] : "getppid";
	long extra_nr = SYS_getppid, path_len = 0;
	int expect = EPERM;
	char *path = NULL;
	uint32_t *lat;
	uint64_t wrong = 0, start, end;
	FILE *f;

	if (calls < 1 || warmup < 1 || pause_us < 0)
		return 2;
	if (!strcmp(mode, "mkdir")) {
		extra_nr = SYS_mkdir;
		path = "/guarded/neighbour";
		expect = EACCES;
	} else if (!strncmp(mode, "mkdirat:", 8) || !strncmp(mode, "openat:", 7)) {
		extra_nr = mode[0] == 'm' ? SYS_mkdirat : SYS_openat;
		path_len = atol(strchr(mode, ':') + 1);
		if (path_len < 10 || path_len > 4095)
			return 2;
		path = malloc((size_t)path_len + 1);
		if (!path)
			fail("malloc");
		memset(path, 'a', (size_t)path_len);
		memcpy(path, "/guarded", 8);
		for (long i = 8; i < path_len - 1; i += 201)
			path[i] = '/';
		path[path_len] = 0;
		expect = EACCES;
	} else if (strcmp(mode, "getppid")) {
		return 2;
	}
	lat = calloc((size_t)calls, sizeof(*lat));	/* touched before timing */
	if (!lat)
		fail("calloc");

	hand_over(sock, "bench", id, notify_filter(extra_nr));
	for (long i = 0; i < warmup; i++)
		syscall(SYS_getppid);
	put_byte(ready);
	drain_until_eof(go);

	start = monotonic_ns();
	for (long i = 0; i < calls; i++) {
		uint64_t t0, t1;
		long rc;
		int err;

		if (pause_us)
			usleep((useconds_t)pause_us);
		t0 = monotonic_ns();
		if (extra_nr == SYS_mkdir)
			rc = syscall(SYS_mkdir, path, 0755);
		else if (extra_nr == SYS_mkdirat)
			rc = syscall(SYS_mkdirat, AT_FDCWD, path, 0755);
		else if (extra_nr == SYS_openat)
			rc = syscall(SYS_openat, AT_FDCWD, path, O_WRONLY | O_CREAT, 0644);
		else
			rc = syscall(SYS_getppid);
		err = errno;
		t1 = monotonic_ns();

		lat[i] = t1 - t0 > UINT32_MAX ? UINT32_MAX : (uint32_t)(t1 - t0);
		if (rc != -1 || err != expect)
			wrong++;
	}
	end = monotonic_ns();

	f = fopen(out, "wb");
	if (!f)
		fail("open OUT");
	fprintf(f, "%ld %llu %llu %llu\n", calls, (unsigned long long)wrong,
		(unsigned long long)start, (unsigned long long)end);
	if (fwrite(lat, sizeof(*lat), (size_t)calls, f) != (size_t)calls || fclose(f))
		fail("write OUT");
	put_byte(done);
	drain_until_eof(quit);
	return 0;
}
