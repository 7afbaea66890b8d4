//! Whether this process records: one state, changed only through the named transitions below.
//!
//! ```text
//!   Uninit --begin_init--> Initializing --end_init--> Active | Disabled | Uninit (decide later)
//!   Active --finish--> Finished --resume (exec failed)--> Active
//!   any --disable (write error, descriptor closed, fork child)--> Disabled
//!   Disabled | Finished --begin_session (memtrack_start, loaded late)--> Initializing
//! ```
//!
//! Must never: block, allocate, or call out of the tracker (the hooks read it on every call).

use std::sync::atomic::{AtomicU8, Ordering};

/// The recording state of the process.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum State {
    /// Not decided yet (the environment may not be readable this early).
    Uninit = 0,
    /// One thread is deciding (or setting up a forked child's capture); hooks pass through.
    Initializing = 1,
    /// Events are recorded.
    Active = 2,
    /// Off for good: no capture wanted, a forked child, a write error.
    Disabled = 3,
    /// The capture was finished; a failing `exec` can resume it.
    Finished = 4,
}

static STATE: AtomicU8 = AtomicU8::new(State::Uninit as u8);

impl State {
    #[inline(always)]
    fn from_u8(v: u8) -> State {
        match v {
            0 => State::Uninit,
            1 => State::Initializing,
            2 => State::Active,
            3 => State::Disabled,
            _ => State::Finished,
        }
    }
}

/// The state now (acquire: what the transition published is visible).
#[inline]
pub(crate) fn current() -> State {
    State::from_u8(STATE.load(Ordering::Acquire))
}

/// The state now, for the hooks' fast check (a relaxed load).
#[inline(always)]
pub(crate) fn current_relaxed() -> State {
    State::from_u8(STATE.load(Ordering::Relaxed))
}

/// True when events of this process are being recorded.
#[inline]
pub fn is_recording() -> bool {
    current() == State::Active
}

/// `Uninit -> Initializing`: true for the one caller that is to decide.
pub(crate) fn begin_init() -> bool {
    STATE
        .compare_exchange(
            State::Uninit as u8,
            State::Initializing as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_ok()
}

/// `Initializing -> to`: the decision (`Uninit` to decide again later).
pub(crate) fn end_init(to: State) {
    debug_assert!(matches!(
        to,
        State::Active | State::Disabled | State::Uninit
    ));
    STATE.store(to as u8, Ordering::Release);
}

/// A forked child sets up its own capture: `Initializing` whatever the parent's state was.
pub(crate) fn begin_child_init() {
    STATE.store(State::Initializing as u8, Ordering::Release);
}

/// Recording stops for good. True for the caller that stopped it (the one to say why).
pub(crate) fn disable() -> bool {
    STATE.swap(State::Disabled as u8, Ordering::AcqRel) != State::Disabled as u8
}

/// `Active -> Finished`: true for the one caller that is to write the end of the capture.
pub(crate) fn finish() -> bool {
    STATE
        .compare_exchange(
            State::Active as u8,
            State::Finished as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        )
        .is_ok()
}

/// `Finished -> Active`: an `exec` failed, recording goes on in the same capture.
pub(crate) fn resume() {
    let _ = STATE.compare_exchange(
        State::Finished as u8,
        State::Active as u8,
        Ordering::AcqRel,
        Ordering::Acquire,
    );
}

/// `Disabled | Finished -> Initializing`: a recording starts in a running process into which
/// the library was loaded late (`memtrack_start`). True for the one caller that starts it.
pub(crate) fn begin_session() -> bool {
    [State::Disabled, State::Finished, State::Uninit]
        .into_iter()
        .any(|from| {
            STATE
                .compare_exchange(
                    from as u8,
                    State::Initializing as u8,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        })
}
