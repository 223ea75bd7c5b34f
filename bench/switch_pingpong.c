/* What one core charges for switching between two tasks, threads against processes.
 *
 *   gcc -O2 -pthread -o /tmp/switch_pingpong bench/switch_pingpong.c
 *   /tmp/switch_pingpong PAGES RESIDENT_MB     # e.g. 0 100, 400 1000
 *
 * Two tasks on core 1 pass one byte back and forth over two pipes, first as two threads of
 * one process, then as two processes. Each side touches PAGES pages of its own per turn,
 * and each holds RESIDENT_MB of touched memory (a server's size). Prints the time of one
 * round trip (two switches). bench/RESULTS.md, "Issue 12, one core: where the last 0.1 ms
 * goes", has the figures for this machine. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

enum { ROUNDS = 50000 };
static int to_echo[2], to_ping[2];
static int pages;
static long resident_mb;
static volatile char *ours, *theirs;

static double now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e9 + t.tv_nsec;
}

static volatile char *pages_of_own(void) {
    long size = pages > 0 ? pages * 4096L : 4096L;
    return mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
}

static void touch(volatile char *m) {
    for (int p = 0; p < pages; p++) m[p * 4096L + (p * 64) % 4096]++;
}

static void hold_resident(void) {
    long size = resident_mb << 20;
    if (size == 0) return;
    char *m = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    for (long i = 0; i < size; i += 4096) m[i] = 1;
}

static void *echo(void *unused) {
    (void)unused;
    char c;
    for (int i = 0; i < ROUNDS; i++) {
        if (read(to_echo[0], &c, 1) != 1) break;
        touch(theirs);
        if (write(to_ping[1], &c, 1) != 1) break;
    }
    return NULL;
}

static void ping(const char *label) {
    char c = 'x';
    double t0 = now_ns();
    for (int i = 0; i < ROUNDS; i++) {
        touch(ours);
        if (write(to_echo[1], &c, 1) != 1 || read(to_ping[0], &c, 1) != 1) return;
    }
    printf("%-9s pages=%d resident=%ld MiB: %.2f us per round trip\n", label, pages, resident_mb,
           (now_ns() - t0) / ROUNDS / 1e3);
}

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: %s PAGES RESIDENT_MB\n", argv[0]);
        return 2;
    }
    pages = atoi(argv[1]);
    resident_mb = atol(argv[2]);
    cpu_set_t one;
    CPU_ZERO(&one);
    CPU_SET(1, &one);
    sched_setaffinity(0, sizeof one, &one);
    ours = pages_of_own();
    theirs = pages_of_own();
    hold_resident();

    pthread_t thread;
    if (pipe(to_echo) || pipe(to_ping)) return 1;
    pthread_create(&thread, NULL, echo, NULL);
    ping("threads");
    pthread_join(thread, NULL);

    if (pipe(to_echo) || pipe(to_ping)) return 1;
    pid_t child = fork();
    if (child == 0) {
        hold_resident(); /* its own copy, as a worker has its own heap */
        echo(NULL);
        _exit(0);
    }
    ping("processes");
    waitpid(child, NULL, 0);
    return 0;
}
