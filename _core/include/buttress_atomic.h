/* buttress_atomic.h -- the one atomics header every compiled primitive uses.
 *
 * All mutable C state in buttress._core goes through these functions, so the
 * extension is correct without the GIL (free-threaded CPython) as well as with it.
 * GCC/Clang: __atomic builtins; MSVC: _Interlocked* intrinsics (full barriers).
 */
#ifndef BUTTRESS_ATOMIC_H
#define BUTTRESS_ATOMIC_H
#include <stdint.h>

#if defined(_MSC_VER) && !defined(__clang__)
#include <intrin.h>
static __inline int64_t bt_load(int64_t *p) {
    return _InterlockedCompareExchange64((volatile __int64 *)p, 0, 0);
}
static __inline void bt_store(int64_t *p, int64_t v) {
    _InterlockedExchange64((volatile __int64 *)p, v);
}
static __inline int bt_cas(int64_t *p, int64_t expected, int64_t desired) {
    return _InterlockedCompareExchange64((volatile __int64 *)p, desired, expected) == expected;
}
static __inline int64_t bt_fetch_add(int64_t *p, int64_t d) {
    return _InterlockedExchangeAdd64((volatile __int64 *)p, d);
}
static __inline int64_t bt_exchange(int64_t *p, int64_t v) {
    return _InterlockedExchange64((volatile __int64 *)p, v);
}
/* A full (sequentially consistent) fence: orders every earlier load/store before every later one.
 * Needed for store-then-load handshakes (Dekker): "release a permit, then look for waiters" against
 * "queue as a waiter, then look for a permit" -- without it, both sides can miss each other. */
static __inline void bt_fence_seq_cst(void) {
#if defined(_M_ARM64)
    __dmb(_ARM64_BARRIER_ISH);
#elif defined(_M_ARM)
    __dmb(_ARM_BARRIER_ISH);
#else
    _mm_mfence();
#endif
}
/* The same fence directly after a bt_cas / bt_fetch_add / bt_exchange: the _Interlocked* intrinsics are
 * full barriers on every MSVC target, so only the compiler needs telling. */
static __inline void bt_fence_after_rmw(void) { _ReadWriteBarrier(); }
#else
static inline int64_t bt_load(int64_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void bt_store(int64_t *p, int64_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }
static inline int bt_cas(int64_t *p, int64_t expected, int64_t desired) {
    return __atomic_compare_exchange_n(p, &expected, desired, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE);
}
static inline int64_t bt_fetch_add(int64_t *p, int64_t d) {
    /* two's complement wrap-around is defined for the atomic builtins */
    return __atomic_fetch_add(p, d, __ATOMIC_ACQ_REL);
}
static inline int64_t bt_exchange(int64_t *p, int64_t v) {
    return __atomic_exchange_n(p, v, __ATOMIC_ACQ_REL);
}
static inline void bt_fence_seq_cst(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
/* The same fence directly after a bt_cas / bt_fetch_add / bt_exchange: on x86 a locked read-modify-write
 * is already a full barrier (as Linux's smp_mb__after_atomic), elsewhere (AArch64, ...) a real fence. */
#if defined(__x86_64__) || defined(__i386__)
static inline void bt_fence_after_rmw(void) { __atomic_signal_fence(__ATOMIC_SEQ_CST); }
#else
static inline void bt_fence_after_rmw(void) { __atomic_thread_fence(__ATOMIC_SEQ_CST); }
#endif
#endif

#endif /* BUTTRESS_ATOMIC_H */
