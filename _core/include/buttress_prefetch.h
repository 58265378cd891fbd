/* buttress_prefetch.h -- a read prefetch hint for batch loops (no effect on correctness). */
#ifndef BUTTRESS_PREFETCH_H
#define BUTTRESS_PREFETCH_H

#if defined(_MSC_VER) && !defined(__clang__)
#if defined(_M_X64) || defined(_M_IX86)
#include <xmmintrin.h>
#define bt_prefetch(p) _mm_prefetch((const char *)(p), _MM_HINT_T0)
#else
#define bt_prefetch(p) ((void)(p))
#endif
#else
#define bt_prefetch(p) __builtin_prefetch((const void *)(p), 1, 3)
#endif

#endif /* BUTTRESS_PREFETCH_H */
