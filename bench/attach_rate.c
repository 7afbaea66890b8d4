/* The attach benchmark's target: a service-like loop of malloc/free pairs (sizes 16-4111,
 * 64 live slots) that prints, every 250 ms, how many pairs it made in that time: "rate N".
 * Runs for argv[1] seconds. */
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

__attribute__((noinline)) void *work(size_t n) { return malloc(n); }

int main(int argc, char **argv)
{
    double end = now() + (argc > 1 ? atof(argv[1]) : 10);
    void *slots[64] = {0};
    unsigned long x = 88172645463325252UL, pairs = 0;
    double mark = now();
    setvbuf(stdout, NULL, _IOLBF, 0);
    while (now() < end) {
        for (int i = 0; i < 1000; i++) {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17;
            int k = (int)(x % 64);
            free(slots[k]);
            slots[k] = work(16 + (x >> 20) % 4096);
            pairs++;
        }
        double t = now();
        if (t - mark >= 0.25) {
            printf("rate %lu\n", (unsigned long)(pairs / (t - mark)));
            pairs = 0;
            mark = t;
        }
    }
    return 0;
}
