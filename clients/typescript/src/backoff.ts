// Restart delays: exponential from initialDelayMs up to maxDelayMs, each spread ±20% at random
// so that many clients restarting together do not retry in lockstep.

/** The wait before restart number `attempt` (1-based, counted since the runtime was last healthy). */
export function restartDelay(attempt: number, initialDelayMs: number, maxDelayMs: number, random: () => number = Math.random): number {
  const base = Math.min(maxDelayMs, initialDelayMs * 2 ** Math.max(0, attempt - 1));
  return Math.round(base * (0.8 + 0.4 * random()));
}
