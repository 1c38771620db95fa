"""Channel providers: sms (Aliyun Dysmsapi), email (SMTP), push (FCM), and sandboxes."""
