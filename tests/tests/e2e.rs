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
    // The edge counted exactly the auth calls this test made through it (register, login,
    // refresh twice, logout).
    let edge = reqwest::get(&stack.proxy_metrics_url)
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let auth_posts =
        r#"vigil_proxy_requests_total{method="POST",route="auth",status_class="2xx"} 4"#;
    assert!(edge.contains(auth_posts), "{edge}");
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
