use super::*;
use berth_core::content::{BlobStore, Scope, WriterOpts};
use berth_core::labels::Labels;
use berth_metadata::SharingPolicy;

#[test]
fn go_durations() {
    assert_eq!(parse_duration("100ms").unwrap(), Duration::from_millis(100));
    assert_eq!(parse_duration("0s").unwrap(), Duration::ZERO);
    assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
    assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
    assert_eq!(parse_duration("1.5h").unwrap(), Duration::from_secs(5400));
    assert_eq!(parse_duration("250us").unwrap(), Duration::from_micros(250));
    for bad in ["", "10", "1x", "ms"] {
        assert!(parse_duration(bad).is_err(), "{bad}");
    }
}

#[test]
fn settings_are_clamped() {
    let mut c = SchedulerConfig {
        pause_threshold: 0.9,
        mutation_threshold: -5,
        ..Default::default()
    };
    let s = Settings::from_config(&c).unwrap();
    assert_eq!(s.pause_threshold, 0.5);
    assert_eq!(s.mutation_threshold, 0);
    c.startup_delay = "soon".into();
    assert!(Settings::from_config(&c).is_err());
    let t: SchedulerConfig =
        toml::from_str("pause_threshold = 0.1\nschedule_delay = \"5ms\"").unwrap();
    assert_eq!(t.startup_delay, "100ms");
}

fn setup() -> (tempfile::TempDir, Arc<MetadataStore>) {
    let dir = tempfile::tempdir().unwrap();
    let md = Arc::new(MetadataStore::open(&dir.path().join("m.db")).unwrap());
    let blobs: Arc<dyn BlobStore> =
        Arc::new(berth_content::LocalStore::open(&dir.path().join("c")).unwrap());
    md.attach_blobs(blobs, SharingPolicy::Shared);
    (dir, md)
}

fn put(md: &Arc<MetadataStore>, data: &[u8]) -> berth_core::content::Digest {
    let cs = md.content_store().unwrap();
    let mut w = cs
        .writer(
            &Scope::new("a"),
            WriterOpts {
                r#ref: format!("{data:?}"),
                ..Default::default()
            },
        )
        .unwrap();
    w.write(data).unwrap();
    let d = w.digest();
    w.commit(0, None, Labels::new()).unwrap();
    d
}

/// A scheduler with containerd's default settings, no start-up delay and the given
/// deletion threshold.
fn start_now(md: &Arc<MetadataStore>, deletion_threshold: u64) -> Arc<Scheduler> {
    Scheduler::start(
        md.clone(),
        Settings {
            startup_delay: Duration::ZERO,
            deletion_threshold,
            ..Settings::from_config(&Default::default()).unwrap()
        },
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sync_trigger_collects() {
    let (_dir, md) = setup();
    let s = start_now(&md, 0);
    let m = md.clone();
    let d = tokio::task::spawn_blocking(move || put(&m, b"garbage"))
        .await
        .unwrap();
    let stats = s.schedule_and_wait().await.unwrap();
    assert_eq!(stats.removed_blobs, 1);
    assert!(md.blob_store().unwrap().info(&d).is_err());
}

/// Writes a blob, deletes its record and waits (up to 2 s) for a scheduled collection to
/// remove the blob.
async fn delete_and_expect_collection(md: &Arc<MetadataStore>, data: &'static [u8]) {
    let m = md.clone();
    let d = tokio::task::spawn_blocking(move || {
        let d = put(&m, data);
        m.content_store()
            .unwrap()
            .delete(&Scope::new("a"), &d)
            .unwrap();
        d
    })
    .await
    .unwrap();
    let blobs = md.blob_store().unwrap();
    for _ in 0..100 {
        if blobs.info(&d).is_err() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("the blob {data:?} was not collected after its deletion");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deletions_schedule_a_collection() {
    let (_dir, md) = setup();
    let _s = start_now(&md, 1);
    delete_and_expect_collection(&md, b"deleted soon").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_scheduler_does_not_wake_up() {
    let (_dir, md) = setup();
    let s = start_now(&md, 0);
    // A collection of this small database takes well under a millisecond, so the
    // interval derived from pause_threshold 0.02 is a few milliseconds.
    s.schedule_and_wait().await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let after_settling = s.timer_wakeups();
    assert!(
        after_settling <= 2,
        "{after_settling} wakeups after one collection"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        s.timer_wakeups(),
        after_settling,
        "the idle timer kept firing"
    );

    // A deletion still gets collected: the change re-arms the timer.
    delete_and_expect_collection(&md, b"deleted while idle").await;
}
