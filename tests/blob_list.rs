//! ListFiles through a real `peervault` process: the published `filter` applies before paging,
//! `total` counts what the filter keeps, page numbers and tokens agree, and a page number may
//! not reach arbitrarily far.

mod common;

use bytes::Bytes;
use common::NodeBuilder;
use peervault_proto::v1::{FileChunk, ListFilesRequest, file_service_client::FileServiceClient};
use tonic::Code;

#[tokio::test]
async fn the_filter_applies_before_paging_and_total_counts_matches() {
    let node = NodeBuilder::new("all").start();
    let ch = node.channel().await;
    let mut client = FileServiceClient::new(ch.clone());
    for i in 0..80 {
        client
            .upload_file(tokio_stream::iter(vec![FileChunk {
                file_key: format!("f/{i:03}"),
                data: Bytes::from(format!("content {i}")),
                is_last: true,
                ..Default::default()
            }]))
            .await
            .unwrap();
    }
    let want: Vec<String> = (0..80)
        .map(|i| format!("f/{i:03}"))
        .filter(|k| k.contains('7'))
        .collect();
    assert_eq!(want.len(), 17);
    let list = |page: i32, token: String| ListFilesRequest {
        prefix: "f/".into(),
        filter: "7".into(),
        page_size: 10,
        page,
        page_token: token,
    };
    let p1 = client.list_files(list(1, String::new())).await.unwrap().into_inner();
    let keys1: Vec<String> = p1.files.iter().map(|f| f.key.clone()).collect();
    assert_eq!(keys1, want[..10].to_vec(), "page 1 is a full page of matches");
    assert_eq!(p1.total, 17);
    assert!(!p1.next_page_token.is_empty());
    let p2 = client
        .list_files(list(1, p1.next_page_token.clone()))
        .await
        .unwrap()
        .into_inner();
    let keys2: Vec<String> = p2.files.iter().map(|f| f.key.clone()).collect();
    assert_eq!(keys2, want[10..].to_vec());
    assert!(p2.next_page_token.is_empty());
    // The published page numbers give the same pages.
    let n2 = client.list_files(list(2, String::new())).await.unwrap().into_inner();
    let keysn: Vec<String> = n2.files.iter().map(|f| f.key.clone()).collect();
    assert_eq!(keysn, keys2);
    let n3 = client.list_files(list(3, String::new())).await.unwrap().into_inner();
    assert!(n3.files.is_empty());
    assert_eq!(n3.total, 17);
    // Without a filter the total is every file under the prefix.
    let all = client
        .list_files(ListFilesRequest {
            prefix: "f/".into(),
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((all.files.len(), all.total), (80, 80));
    // A page number reaching past a million files is refused.
    let far = client
        .list_files(ListFilesRequest {
            page: 2000,
            page_size: 1000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(far.code(), Code::InvalidArgument, "{far:?}");
}
