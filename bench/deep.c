/* Allocation-heavy loop whose malloc calls sit 64 frames deep (16..4096-byte blocks, freed in a
 * ring as in churn.c). Argument: iterations. */
#include <stdint.h>
#include <stdlib.h>

#define SLOTS 1024
static void *slots[SLOTS];
static void *volatile sink;
static uint64_t state = 88172645463325252ull;

__attribute__((noinline)) static void work(uint64_t i) {
    state ^= state << 13; state ^= state >> 7; state ^= state << 17;
    size_t slot = state % SLOTS;
    free(slots[slot]);
    slots[slot] = malloc(16 + (state >> 20) % 4081);
    sink = slots[slot];
    (void)i;
}

/* not a tail call: the frame stays on the stack */
__attribute__((noinline)) static int dive(int depth, long n) {
    if (depth == 0) {
        for (long i = 0; i < n; i++) work(i);
        return 1;
    }
    int r = dive(depth - 1, n);
    return r + (sink != NULL);
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 3000000;
    /* main + 61 x dive + work: malloc's caller is 64 frames from the root with libc's start */
    int r = dive(60, n);
    for (int i = 0; i < SLOTS; i++) free(slots[i]);
    return r > 0 ? 0 : 1;
}
