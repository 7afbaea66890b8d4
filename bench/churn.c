/* Single-thread malloc/free churn through three call paths: the workload of the
 * performance issue (16..4096-byte blocks). */
#include <stdlib.h>
#include <stdint.h>
#include <stdio.h>

static void *volatile sink;
static uint64_t state = 88172645463325252ull;
static inline uint64_t rnd(void) { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state; }

#define SLOTS 1024
static void *slots[SLOTS];

__attribute__((noinline)) void *alloc_a(size_t n) { return malloc(n); }
__attribute__((noinline)) void *alloc_b(size_t n) { return alloc_a(n); }
__attribute__((noinline)) void *alloc_c(size_t n) { return alloc_b(n); }

__attribute__((noinline)) void step(uint64_t i) {
    uint64_t r = rnd();
    size_t slot = r % SLOTS;
    size_t size = 16 + (r >> 20) % 4081;
    free(slots[slot]);
    switch (i % 3) {
    case 0: slots[slot] = alloc_a(size); break;
    case 1: slots[slot] = alloc_b(size); break;
    default: slots[slot] = alloc_c(size); break;
    }
    sink = slots[slot];
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 6800000;
    for (long i = 0; i < n; i++) step(i);
    for (int i = 0; i < SLOTS; i++) free(slots[i]);
    return 0;
}
