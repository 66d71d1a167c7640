//! End-to-end: the stack `vigil up` runs, over real sockets, and the `vigil` commands.

#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use e2e::{PASSWORD, Running};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_round_trip_works_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let stack = Running::start(dir.path()).await;
    let anon = stack.client();
    let (alice, refresh) = anon.register_and_login("alice@example.com").await;
    let created = alice
        .call(
            "POST",
            "/content",
            Some(json!({"title": "hello", "body": "world"})),
        )
        .await;
    assert_eq!(created.status, 201);
    let listed = alice.call("GET", "/content", None).await;
    assert_eq!(listed.body["items"][0]["title"], "hello");
    // Through the edge: security headers and a request id on every answer.
    let r = stack
        .http()
        .get(format!("{}/auth/me", stack.https_url))
        .bearer_auth(alice.token.as_deref().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert!(
        r.headers().contains_key("strict-transport-security")
            && r.headers().contains_key("x-request-id")
    );
    let refreshed = anon
        .call(
            "POST",
            "/auth/refresh",
            Some(json!({"refresh_token": refresh})),
        )
        .await;
    assert_eq!(refreshed.status, 200);
    let new_refresh = refreshed.body["refresh_token"].as_str().unwrap();
    let out = anon
        .call(
            "POST",
            "/auth/logout",
            Some(json!({"refresh_token": new_refresh})),
        )
        .await;
    assert_eq!(out.status, 204);
    let after = anon
        .call(
            "POST",
            "/auth/refresh",
            Some(json!({"refresh_token": new_refresh})),
        )
        .await;
    assert_eq!(after.status, 401);
    let kid = anon.call("GET", "/.well-known/jwks.json", None).await.body["keys"][0]["kid"].clone();
    let metrics = reqwest::get(&stack.auth_metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains(r#"vigil_auth_logins_total{result="success"} 1"#),
        "{metrics}"
    );
    // The edge counted exactly the auth calls this test made through it: on the auth route
    // the register, the refresh and the logout (2xx) and the refresh after it (401); the login
    // on its own, guarded route.
    let edge = reqwest::get(&stack.proxy_metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    for posts in [
        r#"vigil_proxy_requests_total{method="POST",route="auth",status_class="2xx"} 3"#,
        r#"vigil_proxy_requests_total{method="POST",route="login",status_class="2xx"} 1"#,
    ] {
        assert!(edge.contains(posts), "{edge}");
    }
    // Plain HTTP is redirected to the same path on HTTPS.
    let r = stack
        .http()
        .get(format!("{}/content/", stack.http_url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 308);
    assert_eq!(
        r.headers()["location"].to_str().unwrap(),
        format!("{}/content/", stack.https_url)
    );
    stack.stop().await;

    // Same data directory, new process state: the account, the content and the key are kept.
    let stack = Running::start(dir.path()).await;
    let (alice, _) = stack.client().login("alice@example.com").await;
    let listed = alice.call("GET", "/content", None).await;
    assert_eq!(listed.body["items"][0]["body"], "world");
    let jwks = stack
        .client()
        .call("GET", "/.well-known/jwks.json", None)
        .await;
    assert_eq!(
        jwks.body["keys"][0]["kid"], kid,
        "the signing key is kept across restarts"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_admin_commands_make_an_admin_and_rotate_keys_under_a_running_service() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("auth.toml");
    std::fs::write(
        &config,
        format!(
            "[database]\nurl = \"sqlite://{db}\"\n[tokens]\nkeys_path = \"{keys}\"\nkeys_reload_secs = 1\n\
             [listen]\napi = \"127.0.0.1:0\"\nadmin = \"127.0.0.1:0\"\n",
            db = dir.path().join("vigil.db").display(),
            keys = dir.path().join("keys/signing.json").display(),
        ),
    )
    .unwrap();
    let pw_file = dir.path().join("pw");
    std::fs::write(&pw_file, format!("{PASSWORD}\n")).unwrap();
    let cfg = config.to_str().unwrap();
    let pw = pw_file.to_str().unwrap();
    tokio::task::spawn_blocking({
        let (cfg, pw) = (cfg.to_owned(), pw.to_owned());
        move || {
            vigil::run_args([
                "vigil",
                "auth",
                "--config",
                &cfg,
                "create-user",
                "--admin",
                "root@example.com",
                "--password-file",
                &pw,
            ])
        }
    })
    .await
    .unwrap()
    .unwrap();

    let service = auth::Service::bind(auth::Config::load(&config).unwrap())
        .await
        .unwrap();
    let base = format!("http://{}", service.api_addr());
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let task = tokio::spawn(service.run(async move {
        let _ = stopped.await;
    }));
    let http = reqwest::Client::new();
    let login = http
        .post(format!("{base}/auth/login"))
        .json(&json!({"email": "root@example.com", "password": PASSWORD}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200);
    let token = login.json::<serde_json::Value>().await.unwrap()["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let users = http
        .get(format!("{base}/users"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(users.status(), 200, "create-user --admin made an admin");

    let jwks = || async {
        http.get(format!("{base}/.well-known/jwks.json"))
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    };
    let before = jwks().await["keys"][0]["kid"].as_str().unwrap().to_owned();
    vigil::run_args(["vigil", "auth", "--config", cfg, "rotate-keys"]).unwrap();
    // The running service picks the rotated file up within keys_reload_secs: poll, bounded.
    let mut keys = serde_json::Value::Null;
    for _ in 0..100 {
        keys = jwks().await;
        if keys["keys"].as_array().unwrap().len() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        keys["keys"][1]["kid"],
        before.as_str(),
        "the old key still verifies"
    );
    assert_ne!(keys["keys"][0]["kid"], before.as_str());
    let me = http
        .get(format!("{base}/auth/me"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(
        me.status(),
        200,
        "a token of the previous key keeps working"
    );
    let _ = stop.send(());
    task.await.unwrap().unwrap();
}

#[test]
fn config_errors_name_the_file_and_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("auth.toml");
    std::fs::write(
        &config,
        "[tokens]\naccess_ttl_secs = 1\n[limits]\nbody_bytes = 1\nsize = 3\n[listen]\napi = 5\n",
    )
    .unwrap();
    let err = vigil::run_args([
        "vigil",
        "auth",
        "--config",
        config.to_str().unwrap(),
        "check",
    ])
    .unwrap_err();
    let text = format!("{err:#}");
    let file = config.display().to_string();
    assert!(
        text.contains(&format!(
            "{file}: tokens.access_ttl_secs: must be between 60 and 3600"
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("{file}: limits.size: unknown field `size`")),
        "{text}"
    );
    assert!(
        text.contains(&format!("{file}: listen.api: invalid type")),
        "{text}"
    );
    let good = format!(
        "[database]\nurl = \"sqlite://{}\"\n[tokens]\nkeys_path = \"{}\"\n",
        dir.path().join("vigil.db").display(),
        dir.path().join("keys.json").display()
    );
    std::fs::write(&config, good).unwrap();
    vigil::run_args([
        "vigil",
        "auth",
        "--config",
        config.to_str().unwrap(),
        "check",
    ])
    .unwrap();
    let weak = dir.path().join("pw");
    std::fs::write(&weak, "short\n").unwrap();
    let err = vigil::run_args([
        "vigil",
        "auth",
        "--config",
        config.to_str().unwrap(),
        "create-user",
        "a@example.com",
        "--password-file",
        weak.to_str().unwrap(),
    ]);
    assert!(format!("{:#}", err.unwrap_err()).contains("at least 12 characters"));
}

/// `GET path` through the edge with `token` as a bearer token: status, `WWW-Authenticate`, body.
async fn get_with(
    stack: &Running,
    path: &str,
    token: Option<&str>,
) -> (u16, String, serde_json::Value) {
    let mut req = stack.http().get(format!("{}{path}", stack.https_url));
    if let Some(t) = token {
        req = req.bearer_auth(t);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let challenge = r
        .headers()
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default();
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    (status, challenge, body)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims the auth service would issue for `sub`.
fn claims_for(sub: &str) -> serde_json::Value {
    let now = unix_now();
    json!({"iss": "vigil-auth", "aud": "vigil", "sub": sub, "role": "user", "sid": "s",
        "iat": now, "nbf": now, "exp": now + 900, "jti": "j"})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_edge_lets_only_well_authenticated_requests_reach_content() {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
    let dir = tempfile::tempdir().unwrap();
    let stack = Running::start(dir.path()).await;
    let (alice, _) = stack.client().register_and_login("alice@example.com").await;
    let token = alice.token.clone().unwrap();
    let me = alice.call("GET", "/auth/me", None).await;
    let alice_id = me.body["id"].as_str().unwrap().to_owned();

    // A real login: through, and the edge knows the caller.
    let (status, _, body) = get_with(&stack, "/content", Some(&token)).await;
    assert_eq!(status, 200, "{body}");
    let line = stack.access_log_line(|l| l["route"] == "content").await;
    assert_eq!(line["subject"], alice_id.as_str());
    assert_eq!(line["decision"], "allow");

    // A token whose jku names a listener this test owns: refused, and never fetched.
    let trap = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    trap.set_nonblocking(true).unwrap();
    let jku = format!("http://{}/jwks.json", trap.local_addr().unwrap());

    let mut tampered = token.clone().into_bytes();
    let at = token.find('.').unwrap() + 5;
    tampered[at] = if tampered[at] == b'A' { b'B' } else { b'A' };
    let tampered = String::from_utf8(tampered).unwrap();
    let now = unix_now();
    let mut expired = claims_for(&alice_id);
    expired["exp"] = json!(now - 120);
    expired["iat"] = json!(now - 1020);
    let mut other_aud = claims_for(&alice_id);
    other_aud["aud"] = json!("someone-else");
    let none = format!(
        "{}.{}.",
        b64.encode(r#"{"alg":"none"}"#),
        b64.encode(claims_for(&alice_id).to_string())
    );
    // HS256 "signed" with the auth service's public key, naming that key.
    let jwks = stack
        .client()
        .call("GET", "/.well-known/jwks.json", None)
        .await
        .body;
    let public = b64.decode(jwks["keys"][0]["x"].as_str().unwrap()).unwrap();
    let kid = jwks["keys"][0]["kid"].as_str().unwrap();
    let confused = e2e::sign_raw(
        &json!({"alg": "HS256", "kid": kid}),
        &claims_for(&alice_id),
        &jsonwebtoken::EncodingKey::from_secret(&public),
        jsonwebtoken::Algorithm::HS256,
    );
    let cases = [
        ("no token", None, 401, "missing"),
        ("tampered", Some(tampered), 401, "bad_signature"),
        (
            "expired",
            Some(stack.sign(json!({}), &expired)),
            401,
            "expired",
        ),
        (
            "another audience",
            Some(stack.sign(json!({}), &other_aud)),
            401,
            "wrong_audience",
        ),
        ("alg none", Some(none), 401, "alg_not_allowed"),
        (
            "HS256 with the public key",
            Some(confused),
            401,
            "alg_not_allowed",
        ),
        (
            "jku",
            Some(stack.sign(json!({"jku": jku}), &claims_for(&alice_id))),
            401,
            "malformed",
        ),
        (
            "unknown kid",
            Some(stack.sign(json!({"kid": "nope"}), &claims_for(&alice_id))),
            401,
            "unknown_kid",
        ),
    ];
    for (name, token, want_status, want_reason) in &cases {
        let (status, challenge, body) = get_with(&stack, "/content", token.as_deref()).await;
        assert_eq!(status, *want_status, "{name}: {body}");
        assert_eq!(body["error"], *want_reason, "{name}");
        assert_eq!(body["stage"], "jwt", "{name}");
        assert!(
            body["request_id"].as_str().is_some_and(|id| !id.is_empty()),
            "{name}"
        );
        assert!(
            challenge.starts_with("Bearer realm=\"vigil\""),
            "{name}: {challenge}"
        );
        if *want_reason != "missing" {
            assert!(
                challenge.contains(r#"error="invalid_token""#),
                "{name}: {challenge}"
            );
        }
    }
    assert!(
        trap.accept()
            .is_err_and(|e| e.kind() == std::io::ErrorKind::WouldBlock),
        "the proxy never connects to a URL a token names"
    );

    // A user on the admin route: a valid token without the claim is 403.
    let (status, challenge, body) = get_with(&stack, "/users", Some(&token)).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (403, Some("claim_mismatch"))
    );
    assert!(challenge.contains("insufficient_scope"));
    let mut admin = claims_for(&alice_id);
    admin["role"] = json!("admin");
    let (status, _, body) = get_with(&stack, "/users", Some(&stack.sign(json!({}), &admin))).await;
    assert_ne!(status, 403, "the edge lets an admin token through: {body}");

    // Every reason is in the metric, the rejection counter and the access log, as often as
    // it was sent.
    for (_, _, _, reason) in &cases {
        // The access log and the request counters are written after the answer went out.
        stack
            .access_log_line(|l| {
                l["route"] == "content"
                    && l["decision"] == "reject"
                    && l["stage"] == "jwt"
                    && l["reason"] == *reason
            })
            .await;
        let sent = cases.iter().filter(|c| c.3 == *reason).count() as f64;
        let series = format!(
            r#"vigil_proxy_jwt_validations_total{{issuer="vigil-auth",result="{reason}"}}"#
        );
        assert_eq!(stack.proxy_metric(&series).await, sent, "{series}");
        let series = format!(
            r#"vigil_proxy_rejections_total{{reason="{reason}",route="content",stage="jwt"}}"#
        );
        assert_eq!(stack.proxy_metric(&series).await, sent, "{series}");
    }
    assert_eq!(
        stack
            .proxy_metric(r#"vigil_proxy_jwks_keys{issuer="vigil-auth"}"#)
            .await,
        1.0
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_rotation_on_the_auth_service_is_picked_up_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let stack = Running::start(dir.path()).await;
    let (alice, _) = stack.client().register_and_login("alice@example.com").await;
    let old_token = alice.token.clone().unwrap();
    assert_eq!(get_with(&stack, "/content", Some(&old_token)).await.0, 200);
    let mut config = stack.options.auth_config();
    config.tokens.keys_reload_secs = 1;
    let (new_kid, _) = auth::rotate_keys(&config).unwrap();
    // The auth service reloads its key file on its own schedule; then a login signs with the
    // new key, which the edge has not seen: it fetches the JWKS again and lets the token in.
    let mut status = 0;
    for _ in 0..400 {
        let (fresh, _) = stack.client().login("alice@example.com").await;
        let token = fresh.token.unwrap();
        let header: serde_json::Value = {
            use base64::Engine;
            let h = token.split('.').next().unwrap();
            serde_json::from_slice(
                &base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(h)
                    .unwrap(),
            )
            .unwrap()
        };
        if header["kid"] == new_kid.as_str() {
            status = get_with(&stack, "/content", Some(&token)).await.0;
            if status == 200 {
                break;
            }
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200, "a token of the new key is accepted");
    assert_eq!(
        get_with(&stack, "/content", Some(&old_token)).await.0,
        200,
        "the previous key still verifies"
    );
    assert!(
        stack
            .proxy_metric(
                r#"vigil_proxy_jwks_refreshes_total{issuer="vigil-auth",result="success"}"#
            )
            .await
            >= 2.0
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_the_jwks_down_at_start_the_edge_answers_503_then_recovers() {
    let dir = tempfile::tempdir().unwrap();
    let auth_port = e2e::free_port();
    let (https, admin) = (e2e::free_port(), e2e::free_port());
    let text = format!(
        r#"
        [listen]
        https = "127.0.0.1:{https}"
        http = "127.0.0.1:{http}"
        admin = "127.0.0.1:{admin}"
        [tls]
        generated_dir = "{certs}"
        [upstreams.auth]
        addrs = ["127.0.0.1:{auth_port}"]
        [filters.user]
        kind = "jwt"
        issuer = "vigil-auth"
        audiences = ["vigil"]
        algorithms = ["EdDSA"]
        jwks_url = "http://127.0.0.1:{auth_port}/.well-known/jwks.json"
        forward_token = true
        [[routes]]
        name = "auth"
        path_prefix = "/auth/"
        upstream = "auth"
        [[routes]]
        name = "content"
        path_prefix = "/content/"
        upstream = "auth"
        filters = ["user"]
        "#,
        http = e2e::free_port(),
        certs = dir.path().join("certs").display(),
    );
    let built = proxy::build(proxy::config::parse(&text, "test.toml").unwrap(), None).unwrap();
    let edge = proxy::Proxy::new(
        built,
        &proxy::RunOptions {
            threads: 1,
            grace_period_secs: 0,
            upgrade_sock: dir.path().join("upgrade.sock").display().to_string(),
            ..Default::default()
        },
    )
    .unwrap();
    let stop = std::sync::Arc::new(tokio::sync::Notify::new());
    let watch = vigil::NotifyWatch(stop.clone());
    let thread = std::thread::spawn(move || edge.run(Box::new(watch)));
    let pem = {
        let path = dir.path().join("certs/self-signed.crt");
        let mut pem = None;
        for _ in 0..400 {
            if let Ok(p) = std::fs::read(&path) {
                pem = Some(p);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        }
        pem.unwrap()
    };
    let client = reqwest::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(&pem).unwrap())
        .resolve("localhost", ([127, 0, 0, 1], https).into())
        .build()
        .unwrap();
    let base = format!("https://localhost:{https}");
    let metrics_url = format!("http://127.0.0.1:{admin}/metrics");
    // A well-formed EdDSA token: its key would come from the JWKS, which is not there.
    let unverifiable = {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        format!(
            "{}.{}.{}",
            b64.encode(r#"{"alg":"EdDSA","kid":"k1"}"#),
            b64.encode(claims_for("someone").to_string()),
            b64.encode([1u8; 64])
        )
    };
    let mut first = None;
    for _ in 0..400 {
        match client
            .get(format!("{base}/content"))
            .bearer_auth(&unverifiable)
            .send()
            .await
        {
            Ok(r) => {
                first = Some((
                    r.status().as_u16(),
                    r.json::<serde_json::Value>().await.unwrap(),
                ));
                break;
            }
            Err(_) => tokio::time::sleep(std::time::Duration::from_millis(25)).await,
        }
    }
    let (status, body) = first.unwrap();
    assert_eq!(
        (status, body["error"].as_str()),
        (503, Some("jwks_unavailable")),
        "{body}"
    );
    let keys = r#"vigil_proxy_jwks_keys{issuer="vigil-auth"}"#;
    assert_eq!(
        e2e::metric(&metrics_url, keys).await,
        0.0,
        "the metric says so"
    );
    assert!(
        e2e::metric(
            &metrics_url,
            r#"vigil_proxy_jwks_refreshes_total{issuer="vigil-auth",result="failure"}"#
        )
        .await
            >= 1.0
    );

    // The auth service comes up on the address the edge expects.
    let opts = vigil::UpOptions {
        data_dir: dir.path().to_owned(),
        https: ([127, 0, 0, 1], 0).into(),
        http: ([127, 0, 0, 1], 0).into(),
        proxy_admin: ([127, 0, 0, 1], 0).into(),
        auth_listen: ([127, 0, 0, 1], auth_port).into(),
        auth_admin: ([127, 0, 0, 1], 0).into(),
        exporter: ([127, 0, 0, 1], 0).into(),
        exporter_cache_ms: 0,
        grace_period_secs: 0,
        otlp_endpoint: None,
        trace_sampling_ratio: 1.0,
        access_log: proxy::access_log::Sink::default(),
    };
    let service = auth::Service::bind(opts.auth_config()).await.unwrap();
    let (stop_auth, auth_stopped) = tokio::sync::oneshot::channel::<()>();
    let auth_task = tokio::spawn(service.run(async move {
        let _ = auth_stopped.await;
    }));
    let api = e2e::Client::new(&base, client.clone());
    let (alice, _) = api.register_and_login("alice@example.com").await;
    let token = alice.token.unwrap();
    let mut status = 0;
    for _ in 0..400 {
        status = client
            .get(format!("{base}/content"))
            .bearer_auth(&token)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if status == 200 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(status, 200, "the keys loaded once the JWKS answered");
    assert_eq!(e2e::metric(&metrics_url, keys).await, 1.0);
    stop.notify_one();
    tokio::task::spawn_blocking(move || thread.join().unwrap())
        .await
        .unwrap();
    let _ = stop_auth.send(());
    auth_task.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_login_guard_cools_down_a_client_after_ten_real_failures() {
    let dir = tempfile::tempdir().unwrap();
    let stack = Running::start(dir.path()).await;
    let anon = stack.client();
    let (_alice, _) = anon.register_and_login("alice@example.com").await;
    let wrong = json!({"email": "alice@example.com", "password": "not the password at all"});
    // The auth service's own 401s, ten of them: each reaches it.
    for _ in 0..10 {
        let r = anon.call("POST", "/auth/login", Some(wrong.clone())).await;
        assert_eq!(r.status, 401, "{}", r.body);
    }
    // The eleventh attempt, even with the right password, is refused at the edge.
    let right = json!({"email": "alice@example.com", "password": PASSWORD});
    let r = anon.call("POST", "/auth/login", Some(right)).await;
    assert_eq!(r.status, 429, "{}", r.body);
    assert_eq!(
        (r.body["stage"].as_str(), r.body["error"].as_str()),
        (Some("login_guard"), Some("cooling_down"))
    );
    let line = stack
        .access_log_line(|l| l["route"] == "login" && l["status"] == 429)
        .await;
    assert_eq!(
        line["upstream_ms"],
        serde_json::Value::Null,
        "auth was not called"
    );
    assert_eq!(
        stack
            .proxy_metric("vigil_proxy_login_guard_cooldowns_total{policy=\"login\"}")
            .await,
        1.0
    );
    // Other routes are not affected by the login guard.
    let r = anon.call("GET", "/.well-known/jwks.json", None).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_default_waf_refuses_attacks_and_lets_the_api_s_own_data_through() {
    let dir = tempfile::tempdir().unwrap();
    let stack = Running::start(dir.path()).await;
    let anon = stack.client();
    // A password is opaque: one that looks like SQL still registers and signs in.
    let odd = json!({"email": "bob@example.com", "password": "' or 1=1 -- <script>x"});
    assert_eq!(
        anon.call("POST", "/auth/register", Some(odd.clone()))
            .await
            .status,
        201
    );
    let r = anon.call("POST", "/auth/login", Some(odd)).await;
    assert_eq!(r.status, 200, "{}", r.body);
    let (alice, _) = anon.register_and_login("alice@example.com").await;
    // A content body about SQL and shells is stored as the text it is.
    let body = "To find a user run SELECT * FROM users WHERE id = 1; then `cat /etc/hosts`.";
    let created = alice
        .call(
            "POST",
            "/content",
            Some(json!({"title": "Notes", "body": body})),
        )
        .await;
    assert_eq!(created.status, 201, "{}", created.body);
    // The same in a title, or script in a body, is refused at the edge (stage waf).
    for item in [
        json!({"title": "1' union select password from users--", "body": "x"}),
        json!({"title": "t", "body": "<script>alert(document.cookie)</script>"}),
    ] {
        let r = alice.call("POST", "/content", Some(item)).await;
        assert_eq!(
            (r.status, r.body["stage"].as_str()),
            (403, Some("waf")),
            "{}",
            r.body
        );
    }
    let r = anon
        .call("GET", "/auth/me?next=../../../../etc/passwd", None)
        .await;
    assert_eq!(
        (r.status, r.body["stage"].as_str()),
        (403, Some("waf")),
        "{}",
        r.body
    );
    let line = stack
        .access_log_line(|l| l["stage"] == "waf" && l["route"] == "me")
        .await;
    assert!(
        !line["waf_rule_ids"].as_array().unwrap().is_empty(),
        "{line}"
    );
}

/// Every family the exporter of `vigil up` serves (database, certificates, probes, its own).
const EXPORTER_FAMILIES: [&str; 14] = [
    "vigil_exporter_collector_success",
    "vigil_exporter_collector_duration_seconds",
    "vigil_users",
    "vigil_users_disabled",
    "vigil_active_users",
    "vigil_content_items",
    "vigil_sessions_active",
    "vigil_database_up",
    "vigil_database_query_duration_seconds",
    "vigil_tls_certificate_expiry_timestamp_seconds",
    "vigil_tls_certificate_not_before_timestamp_seconds",
    "vigil_probe_success",
    "vigil_probe_duration_seconds",
    "vigil_probe_http_status",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_exporter_counts_what_the_stack_wrote_and_sees_its_certificate() {
    use x509_parser::prelude::{FromDer, X509Certificate};
    let dir = tempfile::tempdir().unwrap();
    let stack = Running::start(dir.path()).await;
    let url = stack.exporter_metrics_url.clone();

    // A fresh stack already shows every family, and its own edge and auth service answer.
    let text = e2e::wait_metric(&url, r#"vigil_probe_success{target="edge_jwks"}"#, 1.0).await;
    for family in EXPORTER_FAMILIES {
        assert!(
            text.contains(&format!("# TYPE {family} gauge")),
            "{family}\n{text}"
        );
    }
    for series in [
        r#"vigil_probe_success{target="auth_health"} 1"#,
        r#"vigil_probe_http_status{target="edge_jwks"} 200"#,
        r#"vigil_exporter_collector_success{collector="database"} 1"#,
        r#"vigil_exporter_collector_success{collector="certificates"} 1"#,
        r#"vigil_exporter_collector_success{collector="probes"} 1"#,
        r#"vigil_users{role="user"} 0"#,
    ] {
        assert!(text.lines().any(|l| l == series), "{series}\n{text}");
    }
    for phase in ["dns", "connect", "tls", "first_byte"] {
        let series =
            format!(r#"vigil_probe_duration_seconds{{phase="{phase}",target="edge_jwks"}} "#);
        assert!(text.contains(&series), "{series}\n{text}");
    }

    // The certificate's dates are the generated certificate's, from the file and the listener.
    let pem = std::fs::read(dir.path().join("certs/self-signed.crt")).unwrap();
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).unwrap();
    let (_, cert) = X509Certificate::from_der(&pem.contents).unwrap();
    let (not_before, not_after) = (
        cert.validity().not_before.timestamp(),
        cert.validity().not_after.timestamp(),
    );
    for name in ["edge", "edge_https"] {
        let expiry = format!(r#"vigil_tls_certificate_expiry_timestamp_seconds{{cert="{name}"}}"#);
        let start =
            format!(r#"vigil_tls_certificate_not_before_timestamp_seconds{{cert="{name}"}}"#);
        assert_eq!(e2e::metric(&url, &expiry).await, not_after as f64);
        assert_eq!(e2e::metric(&url, &start).await, not_before as f64);
    }

    // Known writes through the edge: 3 users register and sign in, an admin is made by the
    // command, one user writes 2 content items.
    let anon = stack.client();
    let (ann, _) = anon.register_and_login("ann@example.com").await;
    anon.register_and_login("bob@example.com").await;
    anon.register_and_login("cid@example.com").await;
    let auth_config = stack.options.auth_config();
    auth::create_user(auth_config, "root@example.com", PASSWORD, true)
        .await
        .unwrap();
    for status in ["draft", "published"] {
        let r = ann
            .call(
                "POST",
                "/content",
                Some(json!({"title": status, "body": "text", "status": status})),
            )
            .await;
        assert_eq!(r.status, 201, "{:?}", r.body);
    }
    let text = e2e::wait_metric(&url, r#"vigil_users{role="user"}"#, 3.0).await;
    for series in [
        r#"vigil_users{role="admin"} 1"#,
        "vigil_users_disabled 0",
        // Seen: the three who signed in; the admin never has.
        r#"vigil_active_users{window="5m"} 3"#,
        r#"vigil_active_users{window="24h"} 3"#,
        r#"vigil_content_items{status="draft"} 1"#,
        r#"vigil_content_items{status="published"} 1"#,
        "vigil_sessions_active 3",
        "vigil_database_up 1",
    ] {
        assert!(text.lines().any(|l| l == series), "{series}\n{text}");
    }
    stack.stop().await;
}

/// Tracing for the auth service, through this test binary's one global subscriber.
fn auth_tracing_to(receiver: &e2e::OtlpReceiver) -> telemetry::Pipeline {
    let config = telemetry::TracingConfig {
        endpoint: Some(receiver.url.clone()),
        sampling_ratio: 1.0,
        export_interval_ms: 100,
        ..Default::default()
    };
    let pipeline = telemetry::Pipeline::start(
        &config,
        "vigil-auth",
        telemetry::Counters::new("vigil_auth"),
    )
    .expect("tracing starts")
    .expect("tracing is on");
    tracing::subscriber::set_global_default(vigil::subscriber(Some(&pipeline)))
        .expect("only this test installs a subscriber");
    pipeline
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_request_is_one_trace_across_the_edge_and_the_auth_service() {
    let receiver = e2e::OtlpReceiver::start().await;
    let auth_tracing = auth_tracing_to(&receiver);
    let dir = tempfile::tempdir().unwrap();
    let url = receiver.url.clone();
    let stack = Running::start_with(
        dir.path(),
        |o| o.otlp_endpoint = Some(url),
        Some(auth_tracing),
    )
    .await;
    let (alice, _) = stack.client().register_and_login("trace@example.com").await;

    // A client outside trusted_proxies cannot pick the trace id.
    let forged = "00-11111111111111111111111111111111-2222222222222222-01";
    let resp = stack
        .http()
        .get(format!("{}/auth/me", stack.https_url))
        .bearer_auth(alice.token.as_deref().unwrap())
        .header("traceparent", forged)
        .header("user-agent", "trace-test/1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let request_id = resp.headers()["x-request-id"].to_str().unwrap().to_owned();
    let line = stack
        .access_log_line(|l| l["request_id"] == request_id.as_str())
        .await;
    let trace_id = line["trace_id"].as_str().unwrap().to_owned();
    assert_eq!(trace_id.len(), 32, "{line}");
    assert_ne!(trace_id, "11111111111111111111111111111111");

    // One trace: the edge's server span with its stages, its client span, and the auth
    // service's server span under it, with the database query and nothing else's parent.
    let spans = receiver
        .trace(&trace_id, |spans| {
            spans
                .iter()
                .any(|s| s.service == "vigil-auth" && s.name == "SELECT users")
                && spans
                    .iter()
                    .any(|s| s.service == "vigil-proxy" && s.kind == 3)
        })
        .await;
    let one = |service: &str, kind: i32| {
        let found: Vec<_> = spans
            .iter()
            .filter(|s| s.service == service && s.kind == kind)
            .collect();
        assert_eq!(found.len(), 1, "{service} kind {kind}: {spans:#?}");
        found[0].clone()
    };
    let edge = one("vigil-proxy", 2);
    assert_eq!(
        edge.parent_span_id, "",
        "the forged parent was not continued"
    );
    assert_eq!(line["span_id"], edge.span_id.as_str());
    assert_eq!(edge.name, "GET me");
    for (k, v) in [
        ("http.request.method", "GET"),
        ("http.route", "me"),
        ("url.path", "/auth/me"),
        ("http.response.status_code", "200"),
        ("client.address", "127.0.0.1"),
        ("network.protocol.version", "2"),
        ("user_agent.original", "trace-test/1"),
        ("tls.protocol.version", "1.3"),
    ] {
        assert_eq!(
            edge.attributes.get(k).map(String::as_str),
            Some(v),
            "{k}: {edge:#?}"
        );
    }
    let stages: Vec<_> = edge
        .events
        .iter()
        .map(|(name, attrs)| (name.as_str(), attrs["vigil.decision"].as_str()))
        .collect();
    assert!(stages.contains(&("stage jwt", "allow")), "{stages:?}");
    assert!(stages.contains(&("stage waf", "allow")), "{stages:?}");
    assert!(
        stages.contains(&("stage rate_limit", "allow")),
        "{stages:?}"
    );
    let upstream = one("vigil-proxy", 3);
    assert_eq!(upstream.parent_span_id, edge.span_id);
    assert_eq!(upstream.attributes["server.address"], "127.0.0.1");
    assert!(upstream.attributes["server.port"].parse::<u16>().is_ok());
    let auth = one("vigil-auth", 2);
    assert_eq!(
        auth.parent_span_id, upstream.span_id,
        "the auth service continued the traceparent the edge sent"
    );
    assert_eq!(auth.attributes["http.route"], "/auth/me");
    let query = spans.iter().find(|s| s.name == "SELECT users").unwrap();
    assert_eq!(query.attributes["db.system"], "sqlite");
    assert_eq!(query.attributes["db.operation.name"], "SELECT");
    let mut ancestor = query.parent_span_id.clone();
    while ancestor != auth.span_id {
        ancestor = spans
            .iter()
            .find(|s| s.span_id == ancestor)
            .unwrap_or_else(|| panic!("the query's ancestors lead to the auth span: {spans:#?}"))
            .parent_span_id
            .clone();
    }

    // The login traced the password check.
    assert!(
        receiver
            .spans()
            .iter()
            .any(|s| s.service == "vigil-auth" && s.name == "password verify")
    );

    // A rejection: its body, its log line and its span carry the same trace id and reason.
    let reply = stack.client().call("GET", "/auth/me", None).await;
    assert_eq!(reply.status, 401);
    let rejected = reply.body["trace_id"].as_str().unwrap().to_owned();
    let line = stack
        .access_log_line(|l| l["trace_id"] == rejected.as_str())
        .await;
    assert_eq!(line["stage"], "jwt");
    let spans = receiver.trace(&rejected, |s| !s.is_empty()).await;
    assert_eq!(spans[0].status, 2, "a rejection is an error span");
    assert_eq!(spans[0].attributes["vigil.stage"], "jwt");
    assert_eq!(
        spans.len(),
        1,
        "a request the edge refused has no upstream span"
    );

    // Exemplars: a real Prometheus scraping both admin endpoints in OpenMetrics stores the
    // trace id of the request above on the request-duration histograms, and every series
    // of the classic registry still parses (each target is up).
    let target = |url: &str| {
        url.trim_start_matches("http://")
            .trim_end_matches("/metrics")
            .to_owned()
    };
    let targets = [
        target(&stack.proxy_metrics_url),
        target(&stack.auth_metrics_url),
    ];
    if let Some(prometheus) = e2e::Prometheus::start(&[&targets[0], &targets[1]]).await {
        let edge = prometheus
            .exemplar_with("vigil_proxy_request_duration_seconds_bucket", &trace_id)
            .await;
        assert!(edge.to_string().contains("\"route\":\"me\""), "{edge}");
        prometheus
            .exemplar_with("vigil_auth_http_request_duration_seconds_bucket", &trace_id)
            .await;
        let up = prometheus.api("query", &[("query", "up")]).await;
        let values: Vec<_> = up["result"]
            .as_array()
            .unwrap()
            .iter()
            .map(|r| r["value"][1].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(values, ["1", "1"], "{up}");
        let series = prometheus
            .api(
                "query",
                &[("query", "count({__name__=~\"vigil_proxy_.+\"})")],
            )
            .await;
        let n: f64 = series["result"][0]["value"][1]
            .as_str()
            .unwrap()
            .parse()
            .unwrap();
        assert!(n > 100.0, "the classic families are scraped too: {series}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_zero_exports_nothing_and_a_dead_collector_costs_no_request() {
    // Sampling 0: every request still gets a trace id, nothing is exported.
    let receiver = e2e::OtlpReceiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let url = receiver.url.clone();
    let stack = Running::start_with(
        dir.path(),
        |o| {
            o.otlp_endpoint = Some(url);
            o.trace_sampling_ratio = 0.0;
        },
        None,
    )
    .await;
    for _ in 0..20 {
        let reply = stack.client().call("GET", "/auth/me", None).await;
        assert_eq!(reply.status, 401);
        assert_eq!(reply.body["trace_id"].as_str().unwrap().len(), 32);
    }
    stack.stop().await;
    assert!(receiver.spans().is_empty(), "{:#?}", receiver.spans());

    // A collector that is down: requests still succeed, and the loss is counted.
    let dead = format!("http://127.0.0.1:{}", e2e::free_port());
    let dir = tempfile::tempdir().unwrap();
    let stack = Running::start_with(dir.path(), |o| o.otlp_endpoint = Some(dead), None).await;
    for _ in 0..20 {
        let reply = stack.client().call("GET", "/auth/me", None).await;
        assert_eq!(reply.status, 401);
    }
    let mut dropped = 0.0;
    for _ in 0..200 {
        dropped = stack
            .proxy_metric("vigil_proxy_trace_spans_dropped_total")
            .await;
        if dropped >= 20.0 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(dropped >= 20.0, "dropped {dropped}");
    assert!(
        stack
            .proxy_metric("vigil_proxy_trace_export_failures_total")
            .await
            >= 1.0
    );
    assert_eq!(
        stack
            .proxy_metric("vigil_proxy_trace_spans_exported_total")
            .await,
        0.0
    );
    stack.stop().await;
}
