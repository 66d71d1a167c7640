//! Password hashing and the password policy.
//!
//! argon2id with OWASP's parameters (19 MiB, 2 passes, 1 lane), PHC strings in the database,
//! every computation on the blocking pool so it never stalls the async workers, and at most one
//! per core at a time: a login flood queues instead of allocating 19 MiB per waiting request
//! and thrashing the cores (the histogram times the computation, not the queue). Verifying a
//! login for an unknown email runs the same computation against a dummy hash, so the answer
//! and its timing do not tell whether the account exists.

use std::sync::Arc;
use std::time::Instant;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use prometheus::Histogram;
use tokio::sync::Semaphore;

/// Shortest accepted password, in characters.
pub const MIN_LEN: usize = 12;
/// Longest accepted password, in characters (bounds the hashing input).
pub const MAX_LEN: usize = 128;

/// A failure of the hashing machinery itself (not a wrong password).
#[derive(Debug, thiserror::Error)]
pub enum HashError {
    /// argon2 refused its input.
    #[error("argon2: {0}")]
    Argon2(String),
    /// The blocking task did not finish.
    #[error("hashing task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Hashes and verifies passwords.
#[derive(Clone)]
pub struct Passwords {
    argon: Argon2<'static>,
    dummy_hash: String,
    duration: Histogram,
    slots: Arc<Semaphore>,
}

impl Passwords {
    /// argon2id with m = 19 MiB, t = 2, p = 1 (OWASP's first recommendation).
    pub fn new(duration: Histogram) -> Self {
        let params = Params::new(19 * 1024, 2, 1, None).expect("OWASP argon2 parameters are valid");
        let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
        let salt = SaltString::generate(&mut OsRng);
        let dummy_hash = argon
            .hash_password(b"vigil dummy password for unknown accounts", &salt)
            .expect("hashing a constant succeeds")
            .to_string();
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        Self {
            argon,
            dummy_hash,
            duration,
            slots: Arc::new(Semaphore::new(cores)),
        }
    }

    /// Runs `f` on the blocking pool once a slot is free, timing `f` alone.
    async fn run<T, F>(&self, f: F) -> Result<T, HashError>
    where
        T: Send + 'static,
        F: FnOnce(&Argon2<'static>) -> T + Send + 'static,
    {
        let _slot = self
            .slots
            .acquire()
            .await
            .map_err(|_| HashError::Argon2("hashing is shut down".into()))?;
        let argon = self.argon.clone();
        let duration = self.duration.clone();
        Ok(tokio::task::spawn_blocking(move || {
            let started = Instant::now();
            let out = f(&argon);
            duration.observe(started.elapsed().as_secs_f64());
            out
        })
        .await?)
    }

    /// Hashes `password` into a PHC string.
    #[tracing::instrument(name = "password hash", skip_all)]
    pub async fn hash(&self, password: String) -> Result<String, HashError> {
        self.run(move |argon| {
            let salt = SaltString::generate(&mut OsRng);
            argon
                .hash_password(password.as_bytes(), &salt)
                .map(|h| h.to_string())
        })
        .await?
        .map_err(|e| HashError::Argon2(e.to_string()))
    }

    /// Whether `password` matches `phc`. With `phc = None` (no such account) the same work is
    /// done against a dummy hash and the answer is `false`.
    #[tracing::instrument(name = "password verify", skip_all)]
    pub async fn verify(&self, password: String, phc: Option<String>) -> Result<bool, HashError> {
        let known = phc.is_some();
        let phc = phc.unwrap_or_else(|| self.dummy_hash.clone());
        let matched = self
            .run(move |argon| {
                let parsed =
                    PasswordHash::new(&phc).map_err(|e| HashError::Argon2(e.to_string()))?;
                Ok::<_, HashError>(argon.verify_password(password.as_bytes(), &parsed).is_ok())
            })
            .await??;
        Ok(known && matched)
    }
}

/// Checks the password policy, naming the rule that failed.
pub fn check_policy(password: &str, email: &str) -> Result<(), &'static str> {
    let len = password.chars().count();
    if len < MIN_LEN {
        return Err("password must be at least 12 characters long");
    }
    if len > MAX_LEN {
        return Err("password must be at most 128 characters long");
    }
    if password.trim().is_empty() {
        return Err("password must not be only white space");
    }
    if password.eq_ignore_ascii_case(email) {
        return Err("password must not be the email address");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::HistogramOpts;

    fn passwords() -> Passwords {
        Passwords::new(Histogram::with_opts(HistogramOpts::new("t", "t")).unwrap())
    }

    #[tokio::test]
    async fn hash_is_argon2id_with_owasp_parameters_and_verifies() {
        let p = passwords();
        let phc = p.hash("correct horse battery".into()).await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{phc}");
        assert!(
            p.verify("correct horse battery".into(), Some(phc.clone()))
                .await
                .unwrap()
        );
        assert!(
            !p.verify("correct horse batterY".into(), Some(phc.clone()))
                .await
                .unwrap()
        );
        let again = p.hash("correct horse battery".into()).await.unwrap();
        assert_ne!(phc, again, "every hash has its own salt");
    }

    #[tokio::test]
    async fn unknown_account_does_the_work_and_fails() {
        let p = passwords();
        assert!(
            !p.verify("vigil dummy password for unknown accounts".into(), None)
                .await
                .unwrap()
        );
        assert_eq!(
            p.duration.get_sample_count(),
            1,
            "the dummy verify was timed like a real one"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn at_most_one_computation_per_core_runs_at_once() {
        use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
        let p = passwords();
        let cores = std::thread::available_parallelism().map_or(1, usize::from);
        let (running, most) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let jobs: Vec<_> = (0..cores * 4)
            .map(|_| {
                let (p, running, most) = (p.clone(), running.clone(), most.clone());
                tokio::spawn(async move {
                    p.run(move |_| {
                        let now = running.fetch_add(1, SeqCst) + 1;
                        most.fetch_max(now, SeqCst);
                        std::thread::sleep(std::time::Duration::from_millis(20));
                        running.fetch_sub(1, SeqCst);
                    })
                    .await
                })
            })
            .collect();
        for job in jobs {
            job.await.unwrap().unwrap();
        }
        assert_eq!(
            most.load(SeqCst),
            cores,
            "the queue filled every slot and no more"
        );
        assert_eq!(
            p.duration.get_sample_count(),
            u64::try_from(cores * 4).unwrap()
        );
    }

    #[tokio::test]
    async fn a_corrupt_stored_hash_is_an_error_not_a_match() {
        assert!(
            passwords()
                .verify("whatever it is".into(), Some("not a PHC string".into()))
                .await
                .is_err()
        );
    }

    #[test]
    fn policy() {
        assert!(check_policy("short", "a@b.c").is_err());
        assert!(check_policy(&"x".repeat(129), "a@b.c").is_err());
        assert!(check_policy("            ", "a@b.c").is_err());
        assert!(check_policy("Someone@Example.com", "someone@example.com").is_err());
        assert!(check_policy("twelve chars", "a@b.c").is_ok());
        assert!(
            check_policy(&"é".repeat(128), "a@b.c").is_ok(),
            "length counts characters, not bytes"
        );
    }
}
