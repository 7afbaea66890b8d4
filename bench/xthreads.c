/* 4 threads, cross-thread frees: each thread allocates blocks (16..4096 bytes) into a ring of
 * mailboxes and frees the blocks its neighbour put there, so nearly every free happens on a
 * thread other than the one that allocated. Argument: rounds per thread. */
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>

#define THREADS 4
#define SLOTS 256

static void *volatile box[THREADS][SLOTS];
static long rounds;

__attribute__((noinline)) static void *produce(size_t n) { return malloc(n); }

static void *worker(void *arg) {
    long me = (long)arg;
    long next = (me + 1) % THREADS;
    uint64_t s = 0x9E3779B97F4A7C15ull * (me + 1);
    for (long i = 0; i < rounds; i++) {
        s ^= s << 13; s ^= s >> 7; s ^= s << 17;
        size_t slot = s % SLOTS;
        /* take the neighbour's block (allocated by another thread) and free it */
        void *theirs = __atomic_exchange_n(&box[next][slot], NULL, __ATOMIC_ACQ_REL);
        free(theirs);
        void *mine = produce(16 + (s >> 20) % 4081);
        void *old = __atomic_exchange_n(&box[me][slot], mine, __ATOMIC_ACQ_REL);
        free(old);
    }
    return NULL;
}

int main(int argc, char **argv) {
    rounds = argc > 1 ? atol(argv[1]) : 1000000;
    pthread_t t[THREADS];
    for (long i = 0; i < THREADS; i++) pthread_create(&t[i], NULL, worker, (void *)i);
    for (int i = 0; i < THREADS; i++) pthread_join(t[i], NULL);
    for (int i = 0; i < THREADS; i++)
        for (int j = 0; j < SLOTS; j++) free(box[i][j]);
    return 0;
}
