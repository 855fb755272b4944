/*
 * bench/flood.c - a flooding container for bench/neighbour.py: many threads
 * making notified calls as fast as the supervisor answers them.
 *
 *   bench-flood SOCK ID KIND THREADS DELAY_US READY_FD GO_FD STOP_FD OUT
 *
 * KIND is what every call of the flood makes the supervisor do:
 *   sync   getppid(2): a plain-function deny (bench/policies/sync_deny.py);
 *   async  mkdir("/guarded/flood"): path_guard reads the path from our memory
 *          (race-checked, in a worker thread) and denies it (EACCES);
 *   slow   the same, with each thread's path on its own page of a userfaultfd
 *          mapping: the page is dropped (MADV_DONTNEED) before every call, and
 *          the fault the supervisor's read then takes is served only after
 *          DELAY_US microseconds, so every read of our memory is that slow;
 *   compute getppid(2) as sync, then DELAY_US microseconds of CPU-bound work
 *          before the next call (a container that computes between calls).
 *
 * 1. Installs a filter that notifies getppid and mkdir, hands the listener
 *    fd over the way runc does (as bench/target.c), makes one call (it blocks
 *    until the session is served), writes a byte to READY_FD and reads GO_FD
 *    until EOF.
 * 2. THREADS threads make KIND calls until STOP_FD reaches EOF; every answer
 *    is checked (getppid: EPERM; mkdir: EACCES).
 * 3. Writes "<calls> <wrong>\n" to OUT, and to stderr what the wrong answers
 *    were ("bench-flood: wrong answers: rc=-1 errno=EPERM x3 ..."): a deadline's
 *    on_error (EPERM), a refused read (EAGAIN) and a lost answer (ENOSYS once the
 *    daemon is gone) are told apart.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <time.h>
#include <fcntl.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/un.h>
#include <unistd.h>

#define PATH "/guarded/flood"
#define MAX_THREADS 1024

static atomic_int stop;
static atomic_ulong calls, wrong;
/* Wrong answers by errno (the last slot: success, or an errno out of range). */
#define WRONG_KINDS 160
static atomic_ulong wrong_by_errno[WRONG_KINDS];
static int kind;	/* 0 sync, 1 async, 2 slow, 3 compute */
static char *uffd_area;
static long page;
static long delay_us;

static void fail(const char *what)
{
	fprintf(stderr, "bench-flood: %s: %s\n", what, strerror(errno));
	exit(3);
}

#include "handoff.h"

static int notify_filter(void)
{
	struct sock_filter code[] = {
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 0, 4),
		BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr)),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_getppid, 1, 0),
		BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, SYS_mkdir, 0, 1),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_USER_NOTIF),
		BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
	};
	return install_listener(code, sizeof(code) / sizeof(code[0]));
}

static void *flood(void *arg)
{
	long i = (long)arg;
	char *path = kind == 2 ? uffd_area + i * page : PATH;

	while (!atomic_load_explicit(&stop, memory_order_relaxed)) {
		long rc;
		int err, expect;

		if (kind == 2 && madvise(path, (size_t)page, MADV_DONTNEED) != 0)
			fail("madvise");
		if (kind == 0 || kind == 3) {
			rc = syscall(SYS_getppid);
			expect = EPERM;
		} else {
			rc = syscall(SYS_mkdir, path, 0755);
			expect = EACCES;
		}
		err = errno;
		if (kind == 3) {	/* the CPU-bound work between two calls */
			struct timespec t0, t;
			clock_gettime(CLOCK_MONOTONIC, &t0);
			do
				clock_gettime(CLOCK_MONOTONIC, &t);
			while ((t.tv_sec - t0.tv_sec) * 1000000L +
			       (t.tv_nsec - t0.tv_nsec) / 1000 < delay_us);
		}
		atomic_fetch_add_explicit(&calls, 1, memory_order_relaxed);
		if (rc != -1 || err != expect) {
			atomic_fetch_add_explicit(&wrong, 1, memory_order_relaxed);
			atomic_fetch_add_explicit(
				&wrong_by_errno[rc == -1 && err > 0 && err < WRONG_KINDS - 1
						? err : WRONG_KINDS - 1],
				1, memory_order_relaxed);
		}
	}
	return NULL;
}

/* Serves the faults on the userfaultfd area, each after delay_us. */
static void *serve_faults(void *arg)
{
	int uffd = (int)(long)arg;
	char *content = aligned_alloc((size_t)page, (size_t)page);

	if (!content)
		fail("aligned_alloc");
	memset(content, 0, (size_t)page);
	memcpy(content, PATH, sizeof(PATH));
	for (;;) {
		struct pollfd pfd = { uffd, POLLIN, 0 };
		struct uffd_msg msg;
		struct uffdio_copy copy;

		if (poll(&pfd, 1, 100) <= 0)
			continue;
		if (read(uffd, &msg, sizeof(msg)) != sizeof(msg))
			continue;
		if (msg.event != UFFD_EVENT_PAGEFAULT)
			continue;
		usleep((useconds_t)delay_us);
		copy.dst = msg.arg.pagefault.address & ~((uint64_t)page - 1);
		copy.src = (uint64_t)(uintptr_t)content;
		copy.len = (uint64_t)page;
		copy.mode = 0;
		copy.copy = 0;
		if (ioctl(uffd, UFFDIO_COPY, &copy) != 0 && errno != EEXIST)
			fail("UFFDIO_COPY");
	}
	return NULL;
}

static void setup_uffd(long threads)
{
	struct uffdio_api api = { .api = UFFD_API, .features = 0 };
	struct uffdio_register reg;
	pthread_t t;
	long uffd = syscall(SYS_userfaultfd, O_CLOEXEC);

	if (uffd < 0)
		fail("userfaultfd");
	if (ioctl((int)uffd, UFFDIO_API, &api) != 0)
		fail("UFFDIO_API");
	uffd_area = mmap(NULL, (size_t)(threads * page), PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (uffd_area == MAP_FAILED)
		fail("mmap");
	reg.range.start = (uint64_t)(uintptr_t)uffd_area;
	reg.range.len = (uint64_t)(threads * page);
	reg.mode = UFFDIO_REGISTER_MODE_MISSING;
	if (ioctl((int)uffd, UFFDIO_REGISTER, &reg) != 0)
		fail("UFFDIO_REGISTER");
	if (pthread_create(&t, NULL, serve_faults, (void *)uffd) != 0)
		fail("pthread_create");
}

int main(int argc, char **argv)
{
	static pthread_t threads[MAX_THREADS];
	long count;
	int ready, go, stop_fd;
	FILE *f;

	if (argc != 10) {
		fprintf(stderr, "usage: bench-flood SOCK ID sync|async|slow THREADS DELAY_US "
				"READY_FD GO_FD STOP_FD OUT\n");
		return 2;
	}
	kind = !strcmp(argv[3], "sync") ? 0 : !strcmp(argv[3], "async") ? 1
	     : !strcmp(argv[3], "slow") ? 2 : !strcmp(argv[3], "compute") ? 3 : -1;
	count = atol(argv[4]);
	delay_us = atol(argv[5]);
	ready = atoi(argv[6]);
	go = atoi(argv[7]);
	stop_fd = atoi(argv[8]);
	page = sysconf(_SC_PAGESIZE);
	if (kind < 0 || count < 1 || count > MAX_THREADS || delay_us < 0)
		return 2;
	if (kind == 2)
		setup_uffd(count);

	hand_over(argv[1], "flood", argv[2], notify_filter());
	syscall(SYS_getppid);	/* blocks until the session is served */
	if (write(ready, "x", 1) != 1)
		fail("write to the harness");
	drain_until_eof(go);
	for (long i = 0; i < count; i++)
		if (pthread_create(&threads[i], NULL, flood, (void *)i) != 0)
			fail("pthread_create");
	drain_until_eof(stop_fd);
	atomic_store(&stop, 1);
	for (long i = 0; i < count; i++)
		pthread_join(threads[i], NULL);
	f = fopen(argv[9], "w");
	if (!f)
		fail("open OUT");
	fprintf(f, "%lu %lu\n", atomic_load(&calls), atomic_load(&wrong));
	if (fclose(f))
		fail("write OUT");
	if (atomic_load(&wrong)) {
		fprintf(stderr, "bench-flood %s: wrong answers:", argv[2]);
		for (int e = 0; e < WRONG_KINDS; e++) {
			unsigned long n = atomic_load(&wrong_by_errno[e]);

			if (!n)
				continue;
			if (e == WRONG_KINDS - 1)
				fprintf(stderr, " other x%lu", n);
			else
				fprintf(stderr, " %s x%lu", strerrorname_np(e), n);
		}
		fprintf(stderr, "\n");
	}
	return 0;
}
