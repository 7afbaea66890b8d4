/* A service-like heap: 128 MiB held in 16..4096-byte blocks (about 64 k of them, replaced at
 * random, as a cache does), with short-lived request temporaries on top. The churn workload's
 * heap is 2 MiB, too small for a sampled estimate to be precise at production rates (relative
 * standard error about sqrt(rate / heap)); this one is what sampling is for.
 * Argument: operations. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define SLOTS 65536
static void *slots[SLOTS];
static void *volatile sink;
static uint64_t state = 0x2545F4914F6CDD1Dull;
static inline uint64_t rnd(void) { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state; }

__attribute__((noinline)) void *cache_entry(size_t n) { return malloc(n); }
__attribute__((noinline)) void *request_temp(size_t n) { return malloc(n); }

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 4000000;
    for (int i = 0; i < SLOTS; i++) slots[i] = cache_entry(16 + rnd() % 4081);
    for (long i = 0; i < n; i++) {
        uint64_t r = rnd();
        size_t slot = r % SLOTS;
        free(slots[slot]);
        slots[slot] = cache_entry(16 + (r >> 20) % 4081);
        void *t = request_temp(64 + (r >> 40) % 512);
        sink = t;
        free(t);
    }
    for (int i = 0; i < SLOTS; i++) free(slots[i]);
    return 0;
}
