/* kvcache: a small multi-threaded key-value cache "service" used by memtrack's quick start.
 *
 * Four worker threads serve synthetic GET/PUT requests against a shared hash table with a
 * size bound (entries are evicted and freed), build per-request scratch buffers (temporary
 * allocations), and grow a shared request log with realloc. One code path leaks on purpose:
 * requests for "admin" keys keep a copy of the key that is never freed.
 *
 * Build: gcc -O1 -g -pthread -o kvcache examples/kvcache.c
 * Run:   memtrack run -o kvcache.cap -- ./kvcache 200000
 */
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define BUCKETS 4096
#define MAX_ENTRIES 20000
#define WORKERS 4

struct entry {
    struct entry *next;
    char *key;
    char *value;
    size_t value_len;
};

static struct entry *table[BUCKETS];
static size_t entries;
static pthread_mutex_t table_lock = PTHREAD_MUTEX_INITIALIZER;

static char *request_log;
static size_t log_len, log_cap;
static pthread_mutex_t log_lock = PTHREAD_MUTEX_INITIALIZER;

static char **admin_audit; /* grows; its strings are never freed: the deliberate leak */
static size_t admin_count;

static uint64_t mix(uint64_t x) {
    x ^= x >> 33; x *= 0xff51afd7ed558ccdull; x ^= x >> 33; x *= 0xc4ceb9fe1a85ec53ull; x ^= x >> 33;
    return x;
}

__attribute__((noinline)) static char *make_key(uint64_t id) {
    char *k = malloc(32);
    snprintf(k, 32, "%s:%llu", (id % 997 == 0) ? "admin" : "user", (unsigned long long)id);
    return k;
}

__attribute__((noinline)) static char *make_value(uint64_t id, size_t *len) {
    *len = 64 + mix(id) % 4000;
    char *v = malloc(*len);
    memset(v, (int)(id & 0x7f), *len);
    return v;
}

__attribute__((noinline)) static void evict_one(size_t bucket) {
    struct entry *e = table[bucket];
    if (!e) return;
    table[bucket] = e->next;
    free(e->key);
    free(e->value);
    free(e);
    entries--;
}

__attribute__((noinline)) static void cache_put(uint64_t id) {
    size_t len;
    char *key = make_key(id);
    char *value = make_value(id, &len);
    struct entry *e = malloc(sizeof *e);
    e->key = key; e->value = value; e->value_len = len;
    size_t b = mix(id) % BUCKETS;
    pthread_mutex_lock(&table_lock);
    static size_t cursor; /* evict from a rotating bucket cursor */
    while (entries >= MAX_ENTRIES) evict_one(cursor++ % BUCKETS);
    e->next = table[b];
    table[b] = e;
    entries++;
    pthread_mutex_unlock(&table_lock);
}

__attribute__((noinline)) static void audit_admin(const char *key) {
    pthread_mutex_lock(&log_lock);
    admin_audit = realloc(admin_audit, (admin_count + 1) * sizeof *admin_audit);
    admin_audit[admin_count++] = strdup(key); /* leaked: never freed */
    pthread_mutex_unlock(&log_lock);
}

__attribute__((noinline)) static size_t cache_get(uint64_t id) {
    char *key = make_key(id);
    size_t found = 0;
    if (strncmp(key, "admin", 5) == 0) audit_admin(key);
    pthread_mutex_lock(&table_lock);
    for (struct entry *e = table[mix(id) % BUCKETS]; e; e = e->next)
        if (strcmp(e->key, key) == 0) { found = e->value_len; break; }
    pthread_mutex_unlock(&table_lock);
    free(key);
    return found;
}

__attribute__((noinline)) static void log_request(const char *what, uint64_t id) {
    char line[64];
    int n = snprintf(line, sizeof line, "%s %llu\n", what, (unsigned long long)id);
    pthread_mutex_lock(&log_lock);
    if (log_len + n > log_cap) {
        log_cap = log_cap ? log_cap * 2 : 4096;
        request_log = realloc(request_log, log_cap);
    }
    memcpy(request_log + log_len, line, n);
    log_len += n;
    if (log_len > (1 << 20)) log_len = 0; /* rotate */
    pthread_mutex_unlock(&log_lock);
}

__attribute__((noinline)) static void handle_request(uint64_t id) {
    /* a temporary scratch buffer per request */
    char *scratch = calloc(1, 256);
    if (mix(id) % 4 == 0) {
        cache_put(id);
        log_request("PUT", id);
    } else {
        scratch[0] = (char)cache_get(id / 2);
        log_request("GET", id);
    }
    free(scratch);
}

struct worker { uint64_t first, count; };

static void *worker_main(void *arg) {
    struct worker *w = arg;
    for (uint64_t i = 0; i < w->count; i++) handle_request(w->first + i);
    return NULL;
}

int main(int argc, char **argv) {
    uint64_t requests = argc > 1 ? strtoull(argv[1], NULL, 10) : 200000;
    pthread_t threads[WORKERS];
    struct worker work[WORKERS];
    for (int i = 0; i < WORKERS; i++) {
        work[i].first = i * requests / WORKERS;
        work[i].count = requests / WORKERS;
        pthread_create(&threads[i], NULL, worker_main, &work[i]);
    }
    for (int i = 0; i < WORKERS; i++) pthread_join(threads[i], NULL);
    printf("kvcache: served %llu requests, %zu entries cached, %zu admin audits\n",
           (unsigned long long)requests, entries, admin_count);
    /* orderly shutdown: the cache and the log are freed; the admin audit strings are not */
    for (size_t b = 0; b < BUCKETS; b++) while (table[b]) evict_one(b);
    free(request_log);
    free(admin_audit);
    return 0;
}
