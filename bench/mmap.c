/* Benchmark: map, touch and unmap in a loop (issue 22's mapped memory). Each round maps SIZE
 * bytes of anonymous private memory from 3 call paths in turn, writes one byte per page and
 * unmaps it (with a third argument `notouch`, no page is written: the calls alone); every 8th
 * round also grows the mapping with mremap. Prints the process's CPU nanoseconds (every thread,
 * the tracker's writer included) per map/unmap pair, measured around the loop only (start-up
 * excluded; CPU time rather than wall time, which other load on the machine skews).
 *   mmap SIZE ROUNDS [notouch] */
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <time.h>

static volatile size_t sink;
static int touch = 1;

static void touch_unmap(char *m, size_t size, int grow) {
    if (m == MAP_FAILED)
        exit(1);
    for (size_t i = 0; touch && i < size; i += 4096)
        m[i] = (char)i;
    if (grow) {
        char *g = mremap(m, size, 2 * size, MREMAP_MAYMOVE);
        if (g == MAP_FAILED)
            exit(1);
        m = g;
        size *= 2;
    }
    sink += touch ? (size_t)m[0] : 0;
    munmap(m, size);
}

#define PATH(name)                                                                                 \
    __attribute__((noinline)) static void name(size_t size, int grow) {                            \
        touch_unmap(mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0),  \
                    size, grow);                                                                   \
    }
PATH(path_a)
PATH(path_b)
PATH(path_c)

int main(int argc, char **argv) {
    if (argc < 3)
        return 2;
    size_t size = strtoull(argv[1], NULL, 10);
    long rounds = strtol(argv[2], NULL, 10);
    touch = !(argc > 3 && argv[3][0] == 'n');
    struct timespec a, b;
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &a);
    for (long i = 0; i < rounds; i++) {
        int grow = (i & 7) == 7;
        switch (i % 3) {
        case 0:
            path_a(size, grow);
            break;
        case 1:
            path_b(size, grow);
            break;
        default:
            path_c(size, grow);
        }
    }
    clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &b);
    double ns = (b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec);
    printf("%.0f\n", ns / rounds);
    return 0;
}
