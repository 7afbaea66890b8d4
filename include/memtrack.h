/*
 * memtrack.h: mark regions of a C or C++ program for memtrack (named spans of one thread's
 * execution: a pipeline step, a request, a phase of start-up), whose memory `memtrack regions`
 * reports.
 *
 *     #include "memtrack.h"
 *
 *     memtrack_region_begin("load_index");
 *     load_index();
 *     memtrack_region_end();
 *
 * Include it and link nothing. Under `memtrack run` (libmemtrack.so preloaded) each call is
 * recorded as a mark in the calling thread's event stream, ordered exactly with its
 * allocations. Without memtrack a call costs a load and a pointer check, and does nothing.
 *
 * - Regions nest: memtrack_region_end() ends the calling thread's innermost open region.
 * - A region belongs to the thread that opened it; end it on that thread.
 * - A region still open when its thread exits, or when the process exits or is killed, is
 *   closed at that thread's last event.
 * - `name` is any NUL-terminated string, copied when first met (names are interned once per
 *   capture); a null name is ignored.
 *
 * How: the functions are libmemtrack.so's exports, looked up once per translation unit with
 * dlsym(RTLD_DEFAULT) (in glibc's libc since 2.34; older glibc needs -ldl). That works alike
 * in PIE and non-PIE executables and in shared libraries, from C and C++. (A weak reference
 * would not: a non-PIE executable resolves an undefined weak function to 0 at link time.)
 * The lookup is made at the first call of each function; calls from several threads at once
 * are safe. These are static inline functions: the program's own copies are local symbols,
 * never exported, so they do not clash with libmemtrack.so's exports of the same names.
 */
#ifndef MEMTRACK_H
#define MEMTRACK_H

#include <dlfcn.h>

#ifndef RTLD_DEFAULT
#define RTLD_DEFAULT ((void *)0)
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef void (*memtrack_begin_fn_)(const char *);
typedef void (*memtrack_end_fn_)(void);

/* Internal: the function `name` of libmemtrack.so, or 0 when it is not in the process, looked
 * up at the first call and kept in `cache` (1: not looked up yet). Racing first calls look it
 * up alike and store the same value. */
static inline void *memtrack_lookup_(void **cache, const char *name)
{
    void *f = __atomic_load_n(cache, __ATOMIC_ACQUIRE);
    if (f == (void *)1) {
        f = dlsym(RTLD_DEFAULT, name);
        __atomic_store_n(cache, f, __ATOMIC_RELEASE);
    }
    return f;
}

/* Enters region `name` on the calling thread (recorded under memtrack; a no-op otherwise). */
static inline void memtrack_region_begin(const char *name)
{
    static void *cache = (void *)1;
    void *f = memtrack_lookup_(&cache, "memtrack_region_begin");
    if (f)
        (__extension__(memtrack_begin_fn_)f)(name);
}

/* Leaves the calling thread's innermost open region. */
static inline void memtrack_region_end(void)
{
    static void *cache = (void *)1;
    void *f = memtrack_lookup_(&cache, "memtrack_region_end");
    if (f)
        (__extension__(memtrack_end_fn_)f)();
}

#ifdef __cplusplus
}
#endif

#endif /* MEMTRACK_H */
