/* Single-thread churn from varied stack depths: each operation frees a random slot (of 4096) and
 * allocates a random size (16..4096 bytes) into it through a random number (2..31) of nested
 * calls of descend(), so the stack changes from one allocation to the next (30 depths, where
 * churn.c has 3 fixed call paths). Everything is freed at the end. Argument: operations
 * (default 3,000,000: about 6 M events). */
#include <stdint.h>
#include <stdlib.h>

#define SLOTS 4096
static void *slots[SLOTS];
static void *volatile sink;
static uint64_t state = 88172645463325252ull;
static inline uint64_t rnd(void) { state ^= state << 13; state ^= state >> 7; state ^= state << 17; return state; }

/* One frame per level: noinline, and the empty asm after the call keeps it from being a tail
 * call (which the compiler could turn into a jump or a loop). */
__attribute__((noinline)) void *descend(int depth, size_t size) {
    void *p = depth > 1 ? descend(depth - 1, size) : malloc(size);
    __asm__ volatile("" ::: "memory");
    return p;
}

int main(int argc, char **argv) {
    long n = argc > 1 ? atol(argv[1]) : 3000000;
    for (long i = 0; i < n; i++) {
        uint64_t r = rnd();
        size_t slot = r % SLOTS;
        size_t size = 16 + (r >> 12) % 4081;
        int depth = 2 + (int)((r >> 40) % 30);
        free(slots[slot]);
        slots[slot] = descend(depth, size);
        sink = slots[slot];
    }
    for (int i = 0; i < SLOTS; i++) free(slots[i]);
    return 0;
}
