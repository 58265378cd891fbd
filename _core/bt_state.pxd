# The breaker state word: (generation:40 | half-open permits in flight:20 | state:4) in ONE int64,
# so a transition and the issue of a half-open permit are each a single compare-and-swap and
# a permit can never be issued across a transition. Every transition starts a new generation.
from libc.stdint cimport int64_t
from bt_atomic cimport bt_load, bt_cas, bt_store

cdef enum:
    ST_CLOSED = 0
    ST_OPEN = 1
    ST_HALF_OPEN = 2
    ST_FORCED_OPEN = 3
    ST_DISABLED = 4
    ST_METRICS_ONLY = 5
    ST_FLIGHT_SHIFT = 4
    ST_GEN_SHIFT = 24
    ST_MAX_FLIGHT = 0xFFFFF

cdef struct state_t:
    int64_t word
    int64_t since[2]     # ns when generation g began lives in since[g & 1]

cdef inline int st_state(int64_t w) noexcept nogil:
    return <int>(w & 0xF)

cdef inline int64_t st_flight(int64_t w) noexcept nogil:
    return (w >> ST_FLIGHT_SHIFT) & ST_MAX_FLIGHT

cdef inline int64_t st_gen(int64_t w) noexcept nogil:
    return w >> ST_GEN_SHIFT

cdef inline int64_t st_transition(state_t *s, int expect_state, int64_t expect_gen, int new_state,
                                  int64_t now) noexcept nogil:
    """Move (expect_state, expect_gen) -> new_state at generation + 1. Returns the new generation,
    or -1 if the word no longer holds (expect_state, expect_gen): exactly one racer wins."""
    cdef int64_t w = bt_load(&s.word), gen = expect_gen + 1
    if st_state(w) != expect_state or st_gen(w) != expect_gen:
        return -1
    # Written before the CAS, so a reader of generation gen never sees an older timestamp. Only a
    # racer that saw (expect_state, expect_gen) a moment ago writes it, so a loser's value differs
    # from the winner's by that moment at most.
    bt_store(&s.since[gen & 1], now)
    while True:
        w = bt_load(&s.word)
        if st_state(w) != expect_state or st_gen(w) != expect_gen:
            return -1
        if bt_cas(&s.word, w, (gen << ST_GEN_SHIFT) | new_state):
            return gen

cdef inline bint st_try_flight(state_t *s, int64_t gen, int64_t limit) noexcept nogil:
    """Take a half-open permit of generation gen if fewer than limit are out."""
    cdef int64_t w
    while True:
        w = bt_load(&s.word)
        if st_state(w) != ST_HALF_OPEN or st_gen(w) != gen or st_flight(w) >= limit:
            return False
        if bt_cas(&s.word, w, w + (1 << ST_FLIGHT_SHIFT)):
            return True

cdef inline bint st_return_flight(state_t *s, int64_t gen) noexcept nogil:
    """Give back a half-open permit of generation gen (no-op for an older generation)."""
    cdef int64_t w
    while True:
        w = bt_load(&s.word)
        if st_state(w) != ST_HALF_OPEN or st_gen(w) != gen or st_flight(w) == 0:
            return False
        if bt_cas(&s.word, w, w - (1 << ST_FLIGHT_SHIFT)):
            return True
